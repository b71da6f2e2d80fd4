"""Bad input fails only itself, on a real redis-server with a real worker process and store.

Replays of issue 10: one NUL byte among 8 concurrent uploads; a name the store cannot hold
reaching the worker (bypassing the gateway) and the sealer; an Idempotency-Key reused with
another archive while the first job runs; a second ``butd serve`` on a store in use.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis

from butd.store.index import FeatureIndex
from butd.store.shard_store import StoreWriter
from butd.store.shards import Alias
from butd.workers import queue as q
from butd.workers.protocol import JobItem
from butd.workers.sealer import Sealer
from tests.integration.test_gateway import gateway, image_bytes, stack, wait_ready
from tests.integration.test_store_writer import item
from tests.redis_proc import free_port

__all__ = ["stack"]  # the module-scoped fixture: Redis, store, one worker


def _wait(cond: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def test_a_nul_in_one_of_8_concurrent_uploads_fails_only_itself(stack: dict[str, Any]) -> None:
    names = [f"conc-{i}" for i in range(7)] + ["a\x00b"]
    with gateway(stack) as client:
        wait_ready(client)

        def post(k: int) -> Any:
            params = {"image_id": names[k], "namespace": "conc"}
            return client.post("/v1/features", content=image_bytes(300 + k), params=params,
                               headers={"content-type": "image/png"})  # fmt: skip

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, range(8)))
    assert [a.status_code for a in answers[:7]] == [200] * 7, [a.text for a in answers]
    bad = answers[7]
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_name"
    assert "printable" in bad.json()["detail"]
    # A fresh gateway (no in-process cache) reads every good record from the sealed store.
    with gateway(stack) as fresh:

        def all_stored() -> bool:
            got = [fresh.get(f"/v1/features/{n}", params={"namespace": "conc"}) for n in names[:7]]
            return all(g.status_code == 200 for g in got)

        _wait(all_stored, 60, "the 7 good records to be sealed and indexed")


def test_a_bad_name_reaching_the_worker_fails_only_its_item(stack: dict[str, Any]) -> None:
    data = stack["data"] / "badname"
    data.mkdir()
    items = []
    for i in range(4):
        path = data / f"{i}.png"
        path.write_bytes(image_bytes(400 + i))
        items.append(JobItem(str(path), "bad\x00id" if i == 2 else f"{i}.png"))
    r = redis.Redis.from_url(stack["redis"].url)
    q.create_job(r, "badname-job", items, namespace="direct")

    def ended() -> Any:
        status = q.job_status(r, "badname-job")
        return status if status is not None and status.state in ("done", "failed") else None

    status = _wait(ended, 120, "the job to end")
    assert (status.done, status.failed) == (3, 1)
    (reason,) = status.errors.values()
    assert "printable" in reason
    index = FeatureIndex(r)
    assert all(index.lookup_alias("direct", f"{i}.png") for i in (0, 1, 3))


def test_one_unstorable_record_never_drops_the_good_ones_sharing_its_seal(
    redis_url: str, tmp_path: Path
) -> None:
    r = q.connect(redis_url)
    meta = {"objects_vocab": ["a"], "attributes_vocab": ["b"], "feature_dim": 4}
    sink = StoreWriter(tmp_path, FeatureIndex(r), writer_id="w1", meta=meta)
    acked: list[list[str]] = []
    sealer = Sealer(sink, acked.append, linger_s=0.5)  # the 8 batches share one seal
    shas = [f"{k:064x}" for k in range(8)]
    names = [f"img-{k}" for k in range(8)]
    names[5] = "a\x00b"  # what h5py refuses: "VLEN strings do not support embedded NULLs"
    try:
        for sha, name in zip(shas, names, strict=True):
            sealer.put(name, [item(sha, name, n=2)], "mv", {}, [Alias("ns", name, sha)])
            sealer.submit([f"entry-{name}"])
        assert sealer.drain(30)
    finally:
        sealer.close()
    assert sorted(e for batch in acked for e in batch) == sorted(f"entry-{n}" for n in names)
    index = FeatureIndex(r)
    for k, (sha, name) in enumerate(zip(shas, names, strict=True)):
        assert (index.lookup_content("mv", sha) is not None) == (k != 5), name
        if k != 5:
            assert index.lookup_alias("ns", name) == sha


def _zip(first: int, n: int) -> bytes:
    """The same bytes on every call: members carry a fixed time (``writestr`` with a bare name
    stamps the clock, so two calls straddling a 2-second tick made different archives)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(first, first + n):
            zf.writestr(
                zipfile.ZipInfo(f"{i}.png", date_time=(2020, 1, 1, 0, 0, 0)), image_bytes(i)
            )
    return buf.getvalue()


def test_a_reused_key_leaves_the_running_job_whole(stack: dict[str, Any]) -> None:
    key = {"Idempotency-Key": "hardening-upload"}
    uploads = stack["root"] / "store" / "jobs" / "uploads"
    with gateway(stack) as client:
        wait_ready(client)
        first = client.post("/v1/jobs", files={"archive": ("a.zip", _zip(500, 12))}, headers=key)
        assert first.status_code == 201, first.text
        other = client.post("/v1/jobs", files={"archive": ("b.zip", _zip(600, 12))}, headers=key)
        assert other.status_code == 409 and other.json()["error"] == "idempotency_key_reused"
        assert "hardening-upload" in other.json()["detail"]
        replay = client.post("/v1/jobs", files={"archive": ("a.zip", _zip(500, 12))}, headers=key)
        assert replay.status_code == 201 and replay.json() == first.json()

        def ended() -> Any:
            body = client.get("/v1/jobs/hardening-upload").json()
            return body if body["state"] in ("done", "failed") else None

        status = _wait(ended, 180, "the archive job to end")
        assert (status["done"], status["failed"]) == (12, 0), status["errors"]
        assert not list(uploads.glob("hardening-upload.*"))  # removed once the job ended
        assert not any((uploads / ".incoming").iterdir())


def test_request_claims_in_redis(redis_url: str) -> None:
    from butd.service.adapters import (
        CLAIM_PENDING_TTL_S,
        CLAIM_TTL_S,
        RedisQueue,
        request_claim_key,
    )

    r = q.connect(redis_url)
    queue = RedisQueue(r, r, heartbeat_max_age_s=5, job_shard_size=8, image_ttl_s=60)
    assert queue.claim_request("k1", "fp-a") is None  # taken by this call
    assert 0 < r.ttl(request_claim_key("k1")) <= CLAIM_PENDING_TTL_S  # a dead taker frees it
    pending = queue.claim_request("k1", "fp-b")
    assert pending is not None and (pending.fingerprint, pending.answer) == ("fp-a", None)
    queue.save_answer("k1", '{"job_id": "k1"}')
    assert r.ttl(request_claim_key("k1")) > CLAIM_TTL_S - 60
    answered = queue.claim_request("k1", "fp-a")
    assert answered is not None and answered.answer == '{"job_id": "k1"}'
    queue.release_request("k1")
    assert queue.claim_request("k1", "fp-c") is None


def _redis_servers_on(store: Path) -> int:
    """redis-server processes working in ``store`` (redis chdirs to its ``--dir``)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        count += comm == "redis-server" and Path(cwd).is_relative_to(store)
    return count


def test_a_second_butd_serve_on_a_store_stops_at_once(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    store, port = tmp_path / "store", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUTD_REDIS_URL")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])

    def serve(port: int) -> list[str]:
        argv = [sys.executable, "-m", "butd.cli.main", "serve", "--port", str(port)]
        return [*argv, "--store-dir", str(store), "--weights", str(stack["weights"])]

    first = subprocess.Popen(serve(port), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        _wait(lambda: httpx_ok(f"http://127.0.0.1:{port}/health/live"), 120, "the first serve")
        assert _redis_servers_on(store) == 1
        second = subprocess.run(serve(free_port()), env=env, capture_output=True, text=True,
                                timeout=120)  # fmt: skip
        assert second.returncode == 1, second.stderr
        assert f"pid {first.pid}" in second.stderr and f"127.0.0.1:{port}" in second.stderr
        assert "--store-dir OTHER_DIR --port OTHER_PORT" in second.stderr
        assert _redis_servers_on(store) == 1  # the second started no redis-server
        assert httpx_ok(f"http://127.0.0.1:{port}/health/live")  # the first is unharmed
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)


def httpx_ok(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
