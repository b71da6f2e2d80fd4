"""The gateway end to end: real redis-server, a real worker process (tiny model, CPU), real store.

One Redis, one store and one worker serve the whole module (a worker start imports torch and
loads the model: seconds on a loaded machine); tests that stop or pause the worker restart or
resume it. Each test builds its own gateway app (``create_app``) with the settings it needs.

Fidelity tolerance: the store keeps features as float16, so a stored feature differs from the
in-test ``Extractor`` float32 value by at most one fp16 rounding, |a - b| <= 2**-11 |b| (plus
2**-24 absolute for fp16 subnormals); boxes, labels and confidences are float32 and compared
with rtol 1e-5 (same CPU kernels in both processes).
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from butd.images import decode_image
from butd.service.app import create_app
from butd.service.encoding import decode_features
from butd.service.settings import Settings
from butd.store.readers import read_lxmert_tsv
from butd.workers.protocol import ONLINE_STREAM
from tests.redis_proc import RedisProcess, free_port

FP16_RTOL = 2.0**-11
FP16_ATOL = 2.0**-24


def image_bytes(seed: int, w: int = 120, h: int = 90, fmt: str = "PNG") -> bytes:
    """A random-noise image (the tiny random model finds regions in anything)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


class WorkerProc:
    """``python -m butd.workers.worker`` on the test Redis and store."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "butd.workers.worker"],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis + store + tiny weights + one worker, shared by the module."""
    from tests.tiny_weights import make_tiny_weights

    root = tmp_path_factory.mktemp("gateway")
    weights = make_tiny_weights(root / "tiny.safetensors")
    (root / "redis").mkdir()
    server = RedisProcess(appendonly=True, directory=root / "redis")
    env = dict(os.environ)
    env.update(
        BUTD_REDIS_URL=server.url,
        REDIS_URL=server.url,
        BUTD_STORE_DIR=str(root / "store"),
        BUTD_WEIGHTS=str(weights),
        BUTD_DEVICE="cpu",
        BUTD_BATCH_WAIT_MS="5",
        BUTD_IDLE_BLOCK_MS="200",
        BUTD_HEARTBEAT_S="1",
        BUTD_HEARTBEAT_TTL_S="30",
        BUTD_WORKER_ID="test-worker",
    )
    worker = WorkerProc(env, root / "worker.log")
    worker.start()
    data = root / "data"
    data.mkdir()
    try:
        yield {"root": root, "redis": server, "worker": worker, "weights": weights, "data": data}
    finally:
        worker.stop()
        server.stop()


@contextmanager
def gateway(stack: dict[str, Any], **overrides: Any) -> Iterator[TestClient]:
    values: dict[str, Any] = {
        "redis_url": stack["redis"].url,
        "store_dir": stack["root"] / "store",
        "request_timeout_s": 60.0,
        # Beats come every second; a CPU-starved worker on a loaded machine may beat late, and
        # "no live worker" must not depend on that.
        "heartbeat_max_age_s": 30.0,
        "allowed_roots": [stack["data"]],
    }
    values.update(overrides)
    with TestClient(create_app(Settings(**values))) as client:
        yield client


def wait_ready(client: TestClient, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        resp = client.get("/health/ready")
        if resp.status_code == 200:
            return dict(resp.json())
        time.sleep(0.2)
    raise AssertionError(f"no ready worker in {timeout_s} s: {resp.json()}")


def post(client: TestClient, data: bytes, **params: Any) -> Any:
    return client.post(
        "/v1/features", content=data, params=params, headers={"content-type": "image/png"}
    )


def online_len(stack: dict[str, Any]) -> int:
    return int(redis.Redis.from_url(stack["redis"].url).xlen(ONLINE_STREAM))


def test_upload_equals_direct_extractor_and_repeats_hit_cache(stack: dict[str, Any]) -> None:
    from butd.detector.extractor import Extractor

    data = image_bytes(1)
    with gateway(stack) as client:
        ready = wait_ready(client)
        resp = post(client, data, image_id="one", namespace="t", dtype="float32")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        npz = client.get("/v1/features/one?namespace=t", headers={"accept": "application/x-npz"})
        entries = online_len(stack)
        again = post(client, data, image_id="one-again", namespace="t")
        assert again.status_code == 200 and again.json()["cached"] is True
        assert online_len(stack) == entries  # nothing reached the queue
    ext = Extractor.from_weights(stack["weights"], device="cpu")
    (ref,) = ext.extract([decode_image(data)], ["one"])
    assert body["model_version"] == ext.model_version == ready["model_version"]
    assert body["cached"] is False and body["num_boxes"] == ref.num_boxes > 0
    assert body["objects_id"] == ref.objects_id.tolist()
    assert body["objects"] == [ext.spec.objects_vocab[i] for i in ref.objects_id]
    feats = decode_features(body["features"])
    np.testing.assert_allclose(feats, ref.features, rtol=FP16_RTOL + 1e-5, atol=FP16_ATOL)
    arrays = np.load(io.BytesIO(npz.content))
    np.testing.assert_allclose(arrays["boxes"], ref.boxes, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(arrays["attrs_conf"], ref.attrs_conf, rtol=1e-5, atol=1e-6)
    assert arrays["features"].dtype == np.float16
    assert body["sha256"] == hashlib.sha256(data).hexdigest()


def test_the_answer_equals_what_the_cache_returns_once_sealed(stack: dict[str, Any]) -> None:
    data = image_bytes(77)
    sha = hashlib.sha256(data).hexdigest()
    with gateway(stack) as client:
        wait_ready(client)
        posted = post(client, data, image_id="sealed", namespace="t2")
        assert posted.status_code == 200 and posted.json()["cached"] is False
    r = redis.Redis.from_url(stack["redis"].url)
    deadline = time.monotonic() + 120
    while int(r.xpending(ONLINE_STREAM, "workers")["pending"]) and time.monotonic() < deadline:
        time.sleep(0.05)  # the worker seals and acks after answering
    with gateway(stack) as fresh:  # nothing remembered: read from the sealed shard
        by_sha = fresh.get(f"/v1/features/sha256/{sha}")
        by_id = fresh.get("/v1/features/sealed?namespace=t2")
    assert by_sha.status_code == by_id.status_code == 200
    answer, cached = posted.json(), by_sha.json()
    assert cached["cached"] is True and by_id.json()["features"] == answer["features"]
    per_request = {"request_id", "cached", "image_id", "namespace"}
    for key in set(answer) - per_request:
        assert cached[key] == answer[key], key  # same fp16 features, boxes, labels, model


def test_error_statuses(stack: dict[str, Any]) -> None:
    with gateway(stack, max_body_bytes=50_000, max_pixels=20_000) as client:
        wait_ready(client)
        assert post(client, b"x" * 60_000).status_code == 413
        flat = io.BytesIO()
        Image.new("RGB", (200, 150), (90, 120, 30)).save(flat, format="PNG")  # ~1 kB
        big = post(client, flat.getvalue())
        assert big.status_code == 413 and "30000" in big.json()["detail"]
        assert post(client, b"plain text, no image").status_code == 415
        jpeg = image_bytes(3, fmt="JPEG")
        truncated = post(client, jpeg[: len(jpeg) // 2])  # header only: the worker decodes
        assert truncated.status_code == 422 and truncated.json()["error"] == "worker_error"
        assert "TruncatedImageError" in truncated.json()["detail"]
        assert client.get("/v1/features/never-seen").status_code == 404
        assert client.get(f"/v1/features/sha256/{'a' * 64}").status_code == 404
        outside = client.post("/v1/jobs", json={"paths": [str(stack["root"])]})
        assert outside.status_code == 403
    with gateway(stack, api_keys=["k"]) as client:
        assert post(client, image_bytes(4)).status_code == 401
        ok = client.get("/v1/features/x", headers={"authorization": "Bearer k"})
        assert ok.status_code == 404
        assert client.get("/health/ready").status_code == 200


def test_batch_job_directory_and_archive(stack: dict[str, Any]) -> None:
    folder = stack["data"] / "set"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png"]):
        (folder / name).write_bytes(image_bytes(10 + i))
    (folder / "bad.jpg").write_bytes(b"not an image at all")
    with gateway(stack) as client:
        wait_ready(client)
        created = client.post("/v1/jobs", json={"paths": [str(folder)], "namespace": "set"})
        assert created.status_code == 201, created.text
        status = _wait_job(client, created.json()["job_id"])
        assert (status["state"], status["done"], status["failed"]) == ("done", 3, 1)
        assert status["errors"][0]["image_id"] == "bad.jpg"
        export = client.get(f"/v1/jobs/{status['job_id']}/export?format=lxmert-tsv")
        assert export.status_code == 200 and export.headers["x-records"] == "3"
        out = stack["root"] / "set.tsv"
        out.write_bytes(export.content)
        rows = {r.image_id: r for r in read_lxmert_tsv(out)}
        assert sorted(rows) == ["a", "b", "c"]  # img_id as LXMERT keys it: the file stem
        one = client.get("/v1/features/sub/c.png?namespace=set&dtype=float32").json()
        np.testing.assert_array_equal(decode_features(one["features"]), rows["c"].features)
        stored = client.get(f"/v1/jobs/{status['job_id']}/export?format=lxmert-tsv&ids=stored")
        out.write_bytes(stored.content)
        assert sorted(r.image_id for r in read_lxmert_tsv(out)) == ["a.png", "b.png", "sub/c.png"]

        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("z/x.png", image_bytes(20))
        upload = client.post("/v1/jobs", files={"archive": ("d.zip", buf.getvalue())})
        assert upload.status_code == 201, upload.text
        status = _wait_job(client, upload.json()["job_id"])
        assert (status["state"], status["done"]) == ("done", 1)
        assert client.get("/v1/features/z/x.png").status_code == 200


def _wait_job(client: TestClient, job_id: str, timeout_s: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = client.get(f"/v1/jobs/{job_id}").json()
        if status["state"] in ("done", "failed", "cancelled"):
            return dict(status)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} not finished: {status}")


def test_timeout_504_then_cached_and_queue_full_503(stack: dict[str, Any]) -> None:
    slow, queued = image_bytes(30), image_bytes(31)
    # max_queue_depth=1: whatever throughput the worker measured, one request may be ahead
    with gateway(stack, request_timeout_s=1.0, max_queue_depth=1, heartbeat_max_age_s=60) as client:
        wait_ready(client)
        stack["worker"].signal(signal.SIGSTOP)  # alive (heartbeat fresh) but not working
        try:
            first = post(client, slow)
            assert first.status_code == 504
            assert first.json()["request_id"] == first.headers["x-request-id"]
            full = post(client, queued)
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 2
            assert "queue is full" in full.json()["detail"]
        finally:
            stack["worker"].signal(signal.SIGCONT)
        sha = hashlib.sha256(slow).hexdigest()
        deadline = time.monotonic() + 180
        while client.get(f"/v1/features/sha256/{sha}").status_code != 200:
            assert time.monotonic() < deadline, "the timed-out request was never cached"
            time.sleep(0.2)
        assert post(client, slow).json()["cached"] is True


def test_cache_answers_with_the_worker_stopped(stack: dict[str, Any]) -> None:
    data = image_bytes(40)
    with gateway(stack, heartbeat_max_age_s=5.0) as client:
        wait_ready(client)
        assert post(client, data).status_code == 200
        stack["worker"].stop()
        time.sleep(5.5)  # the last heartbeat is now stale
        assert client.get("/health/ready").status_code == 503
        hit = post(client, data, image_id="after-stop")
        assert hit.status_code == 200 and hit.json()["cached"] is True
        miss = post(client, image_bytes(41))
        assert miss.status_code == 503 and "no worker" in miss.json()["detail"]
    stack["worker"].start()


def test_butd_serve_embedded(stack: dict[str, Any], tmp_path: Path) -> None:
    port = free_port()
    launcher = (
        "import argparse, sys; from butd.cli import serve; "
        "p = argparse.ArgumentParser(); serve.register(p.add_subparsers()); "
        "a = p.parse_args(sys.argv[1:]); sys.exit(a.handler(a))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "BUTD_REDIS_URL")}
    argv = [sys.executable, "-c", launcher, "serve", "--port", str(port), "--device", "cpu"]
    argv += ["--store-dir", str(tmp_path / "store"), "--weights", str(stack["weights"])]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        import httpx

        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "butd serve never became ready"
            time.sleep(0.3)
        resp = httpx.post(f"{base}/v1/features", content=image_bytes(50), timeout=60)
        assert resp.status_code == 200 and resp.json()["num_boxes"] > 0
        assert list((tmp_path / "store" / "redis").glob("appendonly*"))  # AOF under the store
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    assert code == 0
    leftovers = [p for p in os.listdir("/proc") if p.isdigit() and str(tmp_path) in _proc(p)]
    assert leftovers == []  # redis-server (--dir) and the worker (BUTD_STORE_DIR) are gone


def _proc(pid: str) -> str:
    """Command line and environment of a process ("" when gone or unreadable)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes() + Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")
