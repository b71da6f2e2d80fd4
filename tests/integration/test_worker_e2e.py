"""Real worker processes (tiny random model, CPU) on a private redis-server.

Helpers here (``tiny_weights``, ``start_worker``, ``make_images``, ``stored_rows``) are shared
with ``test_recovery.py``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from PIL import Image

from butd.store.h5 import FeatureFile
from butd.store.index import FeatureIndex
from butd.store.records import FeatureRecord
from butd.store.shards import ShardReaders
from butd.workers import queue as q
from butd.workers.protocol import DLQ_STREAM, JOBS_STREAM, JobItem, OnlineRequest

REPO = Path(__file__).resolve().parents[2]
# A smaller input and proposal budget than the tiny model's defaults: ~0.1 s per image on a
# busy core (the default budget costs ~0.5 s).
FAST_EXTRACTION = {"rpn_pre_nms_topk": 100, "rpn_post_nms_topk": 10, "min_size": 48, "max_size": 64}


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A canonical weights file of the tiny random model, made once per session."""
    from tests.tiny_weights import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny.safetensors")


class WorkerProc:
    """``python -m butd.workers.worker`` as a child process, logging to a file."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in wait/kill)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "butd.workers.worker"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, r: redis.Redis, timeout: float = 120.0) -> None:
        """Until the heartbeat says the model is loaded (the process reads the streams)."""
        wait_for(
            lambda: any(b.worker_id == self.name and b.loaded for b in q.live_workers(r)),
            timeout,
            f"worker {self.name} ready",
            self,
        )

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self._log.close()


@pytest.fixture
def start_worker(
    redis_url: str, tmp_path: Path, tiny_weights: Path
) -> Iterator[Callable[..., WorkerProc]]:
    """Factory of worker processes sharing this test's redis and store; all killed at the end."""
    procs: list[WorkerProc] = []

    def start(name: str, **settings: Any) -> WorkerProc:
        env = dict(os.environ)
        env.update(
            REDIS_URL=redis_url,
            BUTD_STORE_DIR=str(tmp_path / "store"),
            BUTD_WEIGHTS=str(tiny_weights),
            BUTD_WORKER_ID=name,
            DEVICE="cpu",
            OMP_NUM_THREADS="1",
            BUTD_EXTRACTION=json.dumps(FAST_EXTRACTION),
            BATCH_SIZE="8",
            CLAIM_IDLE_MS="4000",
            BUTD_JANITOR_INTERVAL_S="0.5",
            BUTD_IDLE_BLOCK_MS="200",
            BUTD_HEARTBEAT_S="1",
            BUTD_HEARTBEAT_TTL_S="3",
            BUTD_RECONNECT_MAX_S="0.5",
            PYTHONPATH=str(REPO),
        )
        env.update({k.upper(): str(v) for k, v in settings.items()})
        proc = WorkerProc(name, env, tmp_path / f"{name}.log")
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()


def wait_for(
    cond: Callable[[], bool], timeout: float, what: str, *procs: WorkerProc, poll: float = 0.2
) -> None:
    """Poll ``cond`` (Redis errors count as "not yet") until true; fail with the worker logs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if cond():
                return
        except redis.RedisError:
            pass
        for p in procs:
            if p.proc.poll() is not None:
                pytest.fail(f"worker {p.name} exited ({p.proc.returncode}):\n{p.log()[-3000:]}")
        time.sleep(poll)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-3000:]}" for p in procs)
    pytest.fail(f"timed out after {timeout}s waiting for {what}\n{logs}")


def image_bytes(i: int, fmt: str = "PNG", size: tuple[int, int] = (64, 80)) -> bytes:
    """A distinct small noise image."""
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def make_images(directory: Path, n: int, corrupt: dict[int, bytes] | None = None) -> list[JobItem]:
    """``n`` image files (PNG and JPEG alternating); indices in ``corrupt`` get those bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(n):
        fmt = "JPEG" if i % 2 else "PNG"
        path = directory / f"{i:04d}.{fmt.lower()}"
        path.write_bytes((corrupt or {}).get(i, image_bytes(i, fmt)))
        items.append(JobItem(str(path), path.name))
    return items


def stored_rows(store: Path) -> collections.Counter[tuple[str, str]]:
    """(model_version, content sha256) -> how many images rows hold it, over every shard file."""
    rows: collections.Counter[tuple[str, str]] = collections.Counter()
    for path in sorted((store / "shards").glob("*.h5")):
        with FeatureFile(path) as f:
            rows.update((f.model_version, sha) for sha in f.content_sha256())
    return rows


def assert_same_record(answered: FeatureRecord, stored: FeatureRecord) -> None:
    """The same regions, array for array, bytes and dtypes (fp16 features as stored)."""
    assert (answered.image_w, answered.image_h) == (stored.image_w, stored.image_h)
    assert answered.model_version == stored.model_version
    for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        a, b = getattr(answered, name), getattr(stored, name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name
    assert answered.features.dtype == np.float16


def file_sha(item: JobItem) -> str:
    return hashlib.sha256(Path(item.ref).read_bytes()).hexdigest()


def client(url: str) -> redis.Redis:
    r = q.connect(url)
    q.ensure_groups(r)
    return r


# --- tests --------------------------------------------------------------------------------


def test_batch_job_stores_good_images_and_reports_corrupt_ones(
    redis_url: str, tmp_path: Path, start_worker: Callable[..., WorkerProc]
) -> None:
    corrupt = {
        17: image_bytes(17, "PNG")[:300],  # truncated
        101: b"this is not an image\n",
        188: b"",
    }
    items = make_images(tmp_path / "images", 200, corrupt)
    r = client(redis_url)
    worker = start_worker("w1")
    q.create_job(r, "job200", items, namespace="ds", shard_size=50)
    worker.wait_ready(r)
    wait_for(lambda: q.job_status(r, "job200").finished, 240, "job200 done", worker, poll=1)

    status = q.job_status(r, "job200")
    assert status is not None
    assert (status.state, status.total, status.done, status.failed) == ("done", 200, 197, 3)
    assert sorted(status.errors) == [items[i].image_id for i in sorted(corrupt)]
    assert (
        "Truncated" in status.errors[items[17].image_id]
        or "truncated" in status.errors[items[17].image_id]
    )
    assert "NotAnImage" in status.errors[items[101].image_id]
    version = q.live_workers(r)[0].model_version
    rows = stored_rows(tmp_path / "store")
    expected = {(version, file_sha(it)) for i, it in enumerate(items) if i not in corrupt}
    assert set(rows) == expected and set(rows.values()) == {1}
    assert q.pending_count(r)[JOBS_STREAM] == 0 and q.dlq_length(r) == 0


def test_online_requests_expire_and_poison_entries_are_dead_lettered(
    redis_url: str, tmp_path: Path, start_worker: Callable[..., WorkerProc]
) -> None:
    r = client(redis_url)
    # A shard that "crashed" three workers: delivered three times, never acked.
    q.create_job(r, "poison", make_images(tmp_path / "p", 2))
    (entry,) = q.read_entries(r, [JOBS_STREAM], "crashed-1", count=1)
    for name in ("crashed-2", "crashed-3"):
        r.xclaim(JOBS_STREAM, q.GROUP, name, 0, [entry.entry_id])
    late = image_bytes(1000)
    late_req = OnlineRequest("late", hashlib.sha256(late).hexdigest(), "ns", "late", deadline_ms=1)
    q.enqueue_online(r, late_req, late)

    worker = start_worker("w1", claim_idle_ms=500)
    worker.wait_ready(r)
    res = q.wait_result(r, "late", 30)
    assert res is not None and res.status == "expired" and "deadline" in res.reason
    assert r.exists(late_req.image_key or "none") == 0  # the upload is released

    good = image_bytes(1001, "JPEG")
    sha = hashlib.sha256(good).hexdigest()
    deadline = int(time.time() * 1000) + 60_000
    q.enqueue_online(r, OnlineRequest("ok", sha, "ns", "good", deadline_ms=deadline), good)
    res = q.wait_result(r, "ok", 60)
    assert res is not None and res.status == "ok" and res.content_sha256 == sha
    assert res.num_boxes >= 4 and not res.cached
    assert res.record is not None and res.record.num_boxes == res.num_boxes
    # answered before sealing: the seal and the ack follow
    wait_for(lambda: q.pending_count(r)[q.ONLINE_STREAM] == 0, 120, "online entry acked", worker)
    rows = stored_rows(tmp_path / "store")
    assert rows == {(res.model_version, sha): 1}  # the expired image was never computed
    index = FeatureIndex(r)
    location = index.lookup_content(res.model_version, sha)
    assert location is not None
    readers = ShardReaders(tmp_path / "store" / "shards")
    assert_same_record(res.record, readers.get(location))  # the answer = the cache
    readers.close()
    assert index.lookup_alias("ns", "good") == sha
    assert index.lookup(res.model_version, "ns", "good") == index.lookup_content(
        res.model_version, sha
    )
    assert index.lookup_content(res.model_version, sha) is not None

    wait_for(lambda: q.job_status(r, "poison").finished, 120, "poison job failed", worker)
    status = q.job_status(r, "poison")
    assert status is not None and (status.state, status.failed) == ("failed", 2)
    assert all("dead-lettered after 3 deliveries" in why for why in status.errors.values())
    (letter,) = r.xrange(DLQ_STREAM)
    assert q.decode_fields(letter[1])["entry_id"] == entry.entry_id
    assert q.pending_count(r) == {q.ONLINE_STREAM: 0, JOBS_STREAM: 0}

    worker.signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert q.live_workers(r) == []  # the heartbeat is removed on a clean exit
