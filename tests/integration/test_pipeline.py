"""The pipelined worker (``butd.workers.pipeline``) stores exactly what the sequential one stores.

An in-process worker (tiny random model, CPU, private redis-server) runs one job of real photos
(``skimage.data``, JPEG-encoded at several sizes, so the batches mix resized shapes; with a
duplicate and a corrupt file) twice: with loader threads and a finisher thread, and with
``load_threads=0`` (load, extract and seal one after another on the loop). Every stored array
must be equal byte for byte. A seal that fails leaves the shard unacked and its items
unrecorded.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from skimage import data

from butd.store.h5 import FeatureFile
from butd.store.index import FeatureIndex
from butd.store.records import FeatureRecord
from butd.store.shard_store import StoreWriter
from butd.workers import queue as q
from butd.workers.pipeline import PipelinedProcessor
from butd.workers.protocol import JOBS_STREAM, JobItem
from butd.workers.settings import WorkerSettings
from butd.workers.worker import Worker
from tests.integration.test_worker_e2e import client, tiny_weights  # noqa: F401

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "motorcycle")
# The tiny model's scale (short side 96): real photos of these sizes resize to 5 shapes.
SIZES = ((640, 480), (480, 640), (640, 427), (500, 375), (612, 612), (640, 360))


def photo_jpeg(name: str, size: tuple[int, int]) -> bytes:
    """A real photo resized to ``size`` (w, h) and JPEG-encoded."""
    rgb = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    image = Image.fromarray(rgb).convert("RGB").resize(size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_job(directory: Path) -> list[JobItem]:
    """Six photos at six sizes, a duplicate of the first and a corrupt file."""
    directory.mkdir(parents=True, exist_ok=True)
    items = []
    for i, (name, size) in enumerate(zip(PHOTOS, SIZES, strict=True)):
        path = directory / f"{i}-{name}.jpg"
        path.write_bytes(photo_jpeg(name, size))
        items.append(JobItem(str(path), path.name))
    dup = directory / "dup.jpg"
    dup.write_bytes(Path(items[0].ref).read_bytes())
    bad = directory / "bad.jpg"
    bad.write_bytes(Path(items[1].ref).read_bytes()[:500])
    return [*items[:3], JobItem(str(dup), "dup"), *items[3:], JobItem(str(bad), "bad")]


@pytest.fixture(scope="module")
def extractor(tiny_weights: Path) -> Any:  # noqa: F811
    from butd.detector.extractor import Extractor

    return Extractor.from_weights(tiny_weights, device="cpu", batch_size=3)


def make_worker(r: redis.Redis, url: str, store: Path, extractor: Any, **settings: Any) -> Worker:
    spec = extractor.spec
    sink = StoreWriter(
        store,
        FeatureIndex(r),
        writer_id="w",
        meta={
            "objects_vocab": spec.objects_vocab,
            "attributes_vocab": spec.attributes_vocab,
            "feature_dim": spec.arch.feature_dim,
        },
    )
    config = WorkerSettings(
        _env_file=None,
        redis_url=url,
        store_dir=store,
        worker_id="w",
        batch_size=3,
        idle_block_ms=100,
        **settings,
    )
    return Worker(config, extractor, sink, client=r)


def run_job(worker: Worker, r: redis.Redis, items: list[JobItem], job_id: str) -> None:
    q.create_job(r, job_id, items, namespace="ds", shard_size=len(items))
    deadline = time.monotonic() + 120
    try:
        while True:
            status = q.job_status(r, job_id)
            assert status is not None
            if status.finished:
                break
            assert time.monotonic() < deadline, "job not finished in 120 s"
            worker.step()
    finally:
        worker.sealer.close()
        worker.pipeline.close()  # the ack follows the last record


def stored(store: Path) -> dict[str, FeatureRecord]:
    """Every stored record by content sha256."""
    out: dict[str, FeatureRecord] = {}
    for path in sorted((store / "shards").glob("*.h5")):
        with FeatureFile(path) as f:
            for i, sha in enumerate(f.content_sha256()):
                assert sha not in out, "a record stored twice"
                out[sha] = f.read_row(i)
    return out


def test_pipelined_worker_stores_the_sequential_workers_records_bit_for_bit(
    redis_url: str, tmp_path: Path, extractor: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = write_job(tmp_path / "images")
    staged: list[int] = []
    stage = extractor.stage
    monkeypatch.setattr(extractor, "stage", lambda *a: staged.append(1) or stage(*a))
    r = client(redis_url)
    runs = {}
    for threads in (2, 0):
        store = tmp_path / f"store-{threads}"
        worker = make_worker(r, redis_url, store, extractor, load_threads=threads)
        pipelined = isinstance(worker.processor, PipelinedProcessor)
        assert pipelined == (threads > 0)
        run_job(worker, r, items, f"job-{threads}")
        status = q.job_status(r, f"job-{threads}")
        assert status is not None
        assert (status.state, status.done, status.failed) == ("done", 7, 1), status
        assert "bad" in status.errors
        assert q.pending_count(r)[JOBS_STREAM] == 0
        runs[threads] = stored(store)
        r.delete(*FeatureIndex(r).index_keys())  # the second run must compute, not find
    assert len(staged) >= 6  # the pipelined run prepared its images on the loader threads
    piped, plain = runs[2], runs[0]
    assert len(plain) == 6 and piped.keys() == plain.keys()
    shapes = {(rec.image_w, rec.image_h) for rec in plain.values()}
    assert len(shapes) == 6
    for sha, rec in plain.items():
        other = piped[sha]
        assert (other.image_id, other.image_w, other.image_h) == (
            rec.image_id,
            rec.image_w,
            rec.image_h,
        )
        for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            a, b = getattr(rec, name), getattr(other, name)
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert a.tobytes() == b.tobytes(), name
        assert rec.num_boxes > 0


class FailingSink:
    """A sink whose first put raises (a full disk), the rest pass through."""

    def __init__(self, sink: StoreWriter) -> None:
        self.sink = sink
        self.seals = 0

    def has(self, model_version: str, sha256: str) -> bool:
        return self.sink.has(model_version, sha256)

    def put(self, *args: Any, **kwargs: Any) -> None:
        self.seals += 1
        if self.seals == 1:
            raise OSError("No space left on device")
        self.sink.put(*args, **kwargs)


def test_a_failed_seal_leaves_the_shard_pending_and_its_items_unrecorded(
    redis_url: str, tmp_path: Path, extractor: Any
) -> None:
    items = write_job(tmp_path / "images")[:6]  # two pieces of 3
    r = client(redis_url)
    worker = make_worker(r, redis_url, tmp_path / "store", extractor, load_threads=2)
    failing = FailingSink(worker.pipeline.jobs_sink.sink)  # type: ignore[attr-defined]
    worker.pipeline.jobs_sink.sink = failing  # type: ignore[attr-defined]
    q.create_job(r, "j", items, namespace="ds", shard_size=6)
    try:
        worker.step()  # reads and runs the shard
        assert worker.pipeline.drain(30)
    finally:
        worker.sealer.close()
        worker.pipeline.close()
    status = q.job_status(r, "j")
    assert status is not None
    assert failing.seals == 1  # the second piece's seal was skipped, not run
    assert (status.done, status.failed) == (0, 0)  # nothing recorded
    assert q.pending_count(r)[JOBS_STREAM] == 1  # not acked: it will be redelivered
