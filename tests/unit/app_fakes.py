"""In-memory stand-ins for the gateway's Queue and FeatureStore (butd.service.backend protocols).

``FakeQueue`` answers an online request by calling ``worker(request, data)``, which plays the
worker: it may store a record in the ``FakeStore`` and return an ``OnlineResult`` (or None to
simulate a timeout).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from butd.service.backend import RequestClaim
from butd.store.records import FeatureRecord, StoredRecord
from butd.workers.heads_protocol import HeadsRequest, HeadsResult
from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    Heartbeat,
    JobItem,
    JobStatus,
    OnlineRequest,
    OnlineResult,
)
from butd.workers.wire import ModelMeta

MODEL_VERSION = "mv0000000000test"
OBJECTS = ("cat", "dog", "tree", "sky")
ATTRIBUTES = ("red", "green", "tall")

Worker = Callable[[OnlineRequest, bytes], OnlineResult | None]
HeadsWorker = Callable[[HeadsRequest], HeadsResult | None]


def png_bytes(w: int = 32, h: int = 24, seed: int = 0, fmt: str = "PNG") -> bytes:
    """A small random RGB image encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def make_record(image_id: str, n: int = 5, d: int = 8, seed: int = 0) -> FeatureRecord:
    """A valid FeatureRecord with float16 features (as stored)."""
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 10, size=(n, 2)).astype(np.float32)
    boxes = np.concatenate([xy, xy + 5], axis=1).astype(np.float32)
    return FeatureRecord(
        image_id=image_id,
        image_w=32,
        image_h=24,
        boxes=boxes,
        features=rng.standard_normal((n, d)).astype(np.float16),
        objects_id=rng.integers(0, len(OBJECTS), n).astype(np.int64),
        objects_conf=rng.uniform(0, 1, n).astype(np.float32),
        attrs_id=rng.integers(0, len(ATTRIBUTES), n).astype(np.int64),
        attrs_conf=rng.uniform(0, 1, n).astype(np.float32),
        model_version=MODEL_VERSION,
    )


class FakeStore:
    """``FeatureStore`` in a dict."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], StoredRecord] = {}
        self.aliases: dict[tuple[str, str], str] = {}
        self.export_options: dict[str, Any] | None = None
        self.exports: list[tuple[str, str, list[str], str, Path]] = []
        self.remembered: dict[tuple[str, str], StoredRecord] = {}
        self.remembered_aliases: dict[tuple[str, str], str] = {}

    def put(self, sha256: str, record: FeatureRecord) -> StoredRecord:
        stored = StoredRecord(record, sha256, OBJECTS, ATTRIBUTES, "fake model")
        self.records[(record.model_version, sha256)] = stored
        return stored

    def get(self, model_version: str, sha256: str) -> StoredRecord | None:
        return self.records.get((model_version, sha256))

    def resolve(self, namespace: str, image_id: str) -> str | None:
        return self.aliases.get((namespace, image_id))

    def add_alias(self, namespace: str, image_id: str, sha256: str) -> None:
        self.aliases.setdefault((namespace, image_id), sha256)  # first wins, as the index

    def remember(
        self, model_version: str, stored: StoredRecord, alias: tuple[str, str] | None = None
    ) -> None:
        self.remembered[(model_version, stored.sha256)] = stored
        if alias is not None:
            self.remembered_aliases[alias] = stored.sha256

    def export(
        self,
        model_version: str,
        namespace: str,
        image_ids: Sequence[str],
        fmt: str,
        out: Path,
        options: dict[str, Any] | None = None,
    ) -> int:
        self.exports.append((model_version, namespace, list(image_ids), fmt, out))
        self.export_options = options
        out.write_text("\n".join(image_ids))
        return len(image_ids)


class FakeQueue:
    """``Queue`` in memory; ``worker`` answers online requests synchronously."""

    def __init__(self, store: FakeStore, worker: Worker | None = None) -> None:
        self.store = store
        self.worker = worker or self.store_worker
        self.beats = [
            Heartbeat(
                worker_id="w1",
                host="h",
                pid=1,
                device="cpu",
                model_version=MODEL_VERSION,
                loaded=True,
                started_at=1.0,
                updated_at=time.time(),
                heads=("caption", "vqa"),
            )
        ]
        self.depth = 0
        self.up = True
        self.enqueued: list[OnlineRequest] = []
        self.results: dict[str, OnlineResult | None] = {}
        self.jobs: dict[str, JobStatus] = {}
        self.job_items: dict[str, list[JobItem]] = {}
        self.claims: dict[str, RequestClaim] = {}
        self.meta = {MODEL_VERSION: ModelMeta(OBJECTS, ATTRIBUTES, "fake model")}
        self.heads_depth = 0
        self.heads_enqueued: list[HeadsRequest] = []
        self.heads_results: dict[str, HeadsResult | None] = {}
        self.heads_worker: HeadsWorker = self.fake_head

    def store_worker(self, request: OnlineRequest, data: bytes) -> OnlineResult:
        """A worker that stores a record for the bytes, binds the alias and reports ok."""
        self.store.put(request.content_sha256, make_record(request.image_id))
        if request.namespace:
            self.store.add_alias(request.namespace, request.image_id, request.content_sha256)
        return OnlineResult(
            request.request_id, "ok", MODEL_VERSION, request.content_sha256, num_boxes=5
        )

    def _check(self) -> None:
        if not self.up:
            import redis

            raise redis.exceptions.ConnectionError("fake redis is down")

    def ping(self) -> bool:
        self._check()
        return True

    def live_workers(self) -> list[Heartbeat]:
        self._check()
        return list(self.beats)

    def queue_depth(self) -> int:
        self._check()
        return self.depth

    def pending_count(self) -> int:
        self._check()
        return 0

    def enqueue_online(self, request: OnlineRequest, data: bytes, *, max_depth: int) -> int | None:
        self._check()
        if self.depth >= max_depth:
            return self.depth
        self.enqueued.append(request)
        self.results[request.request_id] = self.worker(request, data)
        return None

    def wait_result(self, request_id: str, timeout_s: float) -> OnlineResult | None:
        return self.results.pop(request_id, None)

    def enqueue_heads(self, request: HeadsRequest, *, max_depth: int) -> int | None:
        self._check()
        if self.heads_depth >= max_depth:
            return self.heads_depth
        self.heads_enqueued.append(request)
        self.heads_results[request.request_id] = self.heads_worker(request)
        return None

    def wait_heads(self, request_id: str, timeout_s: float) -> HeadsResult | None:
        return self.heads_results.pop(request_id, None)

    def fake_head(self, request: HeadsRequest) -> HeadsResult:
        """A head that reads the stored record and spreads its attention evenly."""
        stored = self.store.get(request.model_version, request.content_sha256)
        if stored is None:
            return HeadsResult(request.request_id, "error", reason="no stored record")
        n = stored.record.num_boxes
        common = {
            "model_version": request.model_version,
            "head": "fakehead",
            "boxes": stored.record.boxes.tolist(),
            "image_w": stored.record.image_w,
            "image_h": stored.record.image_h,
        }
        if request.task == "caption":
            words = ["a", "cat"]
            att = [[1.0 / n] * n for _ in words]
            return HeadsResult(request.request_id, "ok", words=words, log_prob=-1.5,
                               attention=att, **common)  # fmt: skip
        answers = [("yes", 0.9), ("no", 0.1)][: request.top]
        return HeadsResult(request.request_id, "ok", answers=answers, attention=[[1.0 / n] * n],
                           **common)  # fmt: skip

    def model_meta(self, model_version: str) -> ModelMeta | None:
        self._check()
        return self.meta.get(model_version)

    def create_job(
        self, job_id: str, items: Sequence[JobItem], *, namespace: str, options: ExtractOptions
    ) -> JobStatus:
        if job_id not in self.jobs:
            self.job_items[job_id] = list(items)
            self.jobs[job_id] = JobStatus(
                job_id, "queued", len(items), 0, 0, 1.0, 0.0, 0.0, 0.0, None, {}, namespace,
                options,
            )  # fmt: skip
        return self.jobs[job_id]

    def job_status(self, job_id: str) -> JobStatus | None:
        return self.jobs.get(job_id)

    def claim_request(self, job_id: str, fingerprint: str) -> RequestClaim | None:
        if job_id in self.claims:
            return self.claims[job_id]
        self.claims[job_id] = RequestClaim(fingerprint)
        return None

    def save_answer(self, job_id: str, answer: str) -> None:
        self.claims[job_id] = RequestClaim(self.claims[job_id].fingerprint, answer)

    def release_request(self, job_id: str) -> None:
        self.claims.pop(job_id, None)

    def cancel_job(self, job_id: str) -> str | None:
        job = self.jobs.get(job_id)
        if job is None:
            return None
        self.jobs[job_id] = JobStatus(**{**job.__dict__, "state": "cancelled"})
        return "cancelled"
