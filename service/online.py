"""The online path: bytes in, a stored record out (cache first, then one worker round trip).

``OnlineService.extract`` reads top to bottom like the data flow in ARCHITECTURE.md:
cache lookup (same bytes, same model version: no worker involved) -> validate (pixels,
decodability) -> admission (a live worker, room in the queue) -> enqueue -> wait -> the record
the worker answered with (pushed with its result before the worker seals it: no HDF5 read on
this path; ``docs/workers.md``). Everything here is synchronous; the route runs it in a thread.

``OnlineTimings`` turns the worker's timestamps into histograms of the round trip's phases.

The current model version (the cache key of requests without options) comes from
``Settings.model_version`` when set, else from the newest live heartbeat with a loaded model;
the last one seen is remembered, so cached images are still served while no worker is up.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Histogram

from butd.images import decode_image, probe_image
from butd.service.admission import Admission, admission
from butd.service.backend import FeatureStore, Queue
from butd.service.budget import BudgetTimeoutError, PixelBudget
from butd.service.errors import (
    ConflictError,
    OverloadedError,
    ResultTimeoutError,
    ServiceError,
    WorkerError,
)
from butd.service.metrics import LATENCY_BUCKETS, Metrics
from butd.service.settings import Settings
from butd.store.records import StoredRecord
from butd.workers.options import ExtractOptions
from butd.workers.protocol import Heartbeat, OnlineRequest, OnlineResult
from butd.workers.wire import ModelMeta

logger = logging.getLogger(__name__)

# How long to poll the store for a record a worker answered without sending it, seconds (the
# worker seals right after answering; a batch seals in milliseconds to a few seconds).
SEAL_WAIT_S = 5.0


class OnlineTimings:
    """Histograms of the phases of an online round trip, on the gateway's registry.

    Queue and reply compare the gateway's clock with the worker's (epoch seconds): on
    different hosts they include the clock offset (negative values count as 0).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=registry)

        self.queue = histogram(
            "butd_online_queue_seconds",
            "online request enqueued to its worker batch formed (queue + batch top-up)",
        )
        self.compute = histogram(
            "butd_online_compute_seconds",
            "worker batch formed to its records computed (fetch, decode, extract)",
        )
        self.reply = histogram(
            "butd_online_reply_seconds",
            "worker pushed the answer to the gateway holding it decoded (Redis, BLPOP, decode)",
        )

    def observe(self, enqueued: float, received: float, result: OnlineResult) -> None:
        """Observe one answered request.

        Args:
            enqueued: gateway epoch seconds just before the XADD.
            received: gateway epoch seconds once the answer was decoded.
            result: the answer, with the worker's ``timings`` (none: nothing observed).
        """
        t = result.timings
        if not {"t_batch", "t_extracted", "t_replied"} <= set(t):
            return
        self.queue.observe(max(t["t_batch"] - enqueued, 0.0))
        self.compute.observe(max(t["t_extracted"] - t["t_batch"], 0.0))
        self.reply.observe(max(received - t["t_replied"], 0.0))
        logger.debug(
            "online %s: queue %.1f ms, compute %.1f ms, reply %.1f ms",
            result.request_id,
            1e3 * (t["t_batch"] - enqueued),
            1e3 * (t["t_extracted"] - t["t_batch"]),
            1e3 * (received - t["t_replied"]),
        )


class ModelVersions:
    """The model version of the default extraction, from settings or worker heartbeats.

    Args:
        queue: where heartbeats are read.
        pinned: ``Settings.model_version``; when set, heartbeats only supply descriptions.
        refresh_s: how long a heartbeat read is reused, seconds.
    """

    def __init__(self, queue: Queue, pinned: str | None, refresh_s: float = 1.0) -> None:
        self._queue = queue
        self._pinned = pinned
        self._refresh_s = refresh_s
        self._last: str | None = pinned
        self._descriptions: dict[str, str] = {}
        self._beats: list[Heartbeat] = []
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        self._meta: dict[str, ModelMeta] = {}

    def loaded_workers(self) -> list[Heartbeat]:
        """Live workers with a loaded model, as of the last read (at most ``refresh_s`` old).

        Raises:
            redis.exceptions.ConnectionError: Redis is down (and the last read is stale).
        """
        self._refresh(raise_errors=True)
        return list(self._beats)

    def current(self) -> str | None:
        """The pinned version, the newest loaded worker's, or the last one seen (None if never)."""
        self._refresh(raise_errors=False)
        return self._last

    def _refresh(self, *, raise_errors: bool) -> None:
        with self._lock:
            if time.monotonic() - self._read_at < self._refresh_s:
                return
        try:
            now = time.time()
            beats = [
                b
                for b in self._queue.live_workers()
                if b.loaded and b.model_version and not b.stalled(now)
            ]
        except Exception as exc:  # Redis down: keep serving the cache under the last version
            if raise_errors:
                raise
            logger.warning("model version: heartbeats unavailable: %s", exc)
            return
        with self._lock:
            self._read_at = time.monotonic()
            self._beats = beats
        for beat in beats:
            self._descriptions[beat.model_version] = beat.model
        if beats and not self._pinned:
            self._last = max(beats, key=lambda b: b.started_at).model_version

    def describe(self, version: str) -> str:
        """The description a worker gave for ``version`` ("" if never seen)."""
        return self._descriptions.get(version, "")

    def meta(self, version: str) -> ModelMeta | None:
        """The vocabularies and description a worker published for ``version`` (read from the
        queue once per version: they never change), or None when none was published."""
        found = self._meta.get(version)
        if found is None:
            found = self._queue.model_meta(version)
            if found is not None:
                self._meta[version] = found
        return found


@dataclass(frozen=True)
class Upload:
    """One image as the gateway received it.

    Attributes:
        image_id: the caller's id, or the sha256 when none was given.
        namespace: the id's namespace; "" when no id was given (no alias is bound).
    """

    data: bytes
    sha256: str
    image_id: str
    namespace: str
    options: ExtractOptions


@dataclass(frozen=True)
class Extracted:
    """What ``OnlineService.extract`` returns."""

    stored: StoredRecord
    request_id: str
    cached: bool


class OnlineService:
    """Cache lookup, validation, admission and the worker round trip of one upload."""

    def __init__(
        self,
        queue: Queue,
        store: FeatureStore,
        settings: Settings,
        metrics: Metrics,
        models: ModelVersions,
    ) -> None:
        self.queue = queue
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.models = models
        self.timings = OnlineTimings(metrics.registry)
        self.decodes = PixelBudget(settings.decode_pixel_budget)

    def extract(self, upload: Upload, request_id: str) -> Extracted:
        """The record of ``upload``, from the cache or from a worker.

        Raises:
            ImageError: the bytes are not an acceptable image (mapped to 413/415/422).
            OverloadedError: no live worker, or the online queue is full (503 + Retry-After).
            ResultTimeoutError: no answer within ``request_timeout_s`` (504).
            WorkerError: the worker failed this image (422).
        """
        self.check_alias(upload)
        hit = self.lookup(upload)
        if hit is not None:
            self.metrics.cache_hits.inc()
            return Extracted(hit, request_id, cached=True)
        self.validate(upload.data)
        result = self.round_trip(upload, request_id, self.admit())
        return Extracted(self.read_result(upload, result), request_id, cached=result.cached)

    def check_alias(self, upload: Upload) -> None:
        """Refuse (409) an image id already bound to other bytes: aliases are first-wins."""
        if not upload.namespace:
            return
        bound = self.store.resolve(upload.namespace, upload.image_id)
        if bound is not None and bound != upload.sha256:
            raise ConflictError(
                f"image id {upload.image_id!r} in namespace {upload.namespace!r} already names "
                f"other bytes (sha256 {bound}); use another id or namespace",
                sha256=bound,
            )

    def lookup(self, upload: Upload) -> StoredRecord | None:
        """The cached record of these bytes under the current version (default options only)."""
        if upload.options.overrides():
            return None  # options change the model version: only a worker knows the result
        version = self.models.current()
        if version is None:
            return None
        hit = self.store.get(version, upload.sha256)
        if hit is not None and upload.namespace:
            self.store.add_alias(upload.namespace, upload.image_id, upload.sha256)
        return hit

    def validate(self, data: bytes) -> None:
        """Probe the header (pixel limit) and, when configured, decode the whole image within
        the decode pixel budget (waiting at most the request timeout for room, else 503)."""
        w, h = probe_image(data, max_pixels=self.settings.max_pixels)
        if not self.settings.full_decode_check:
            return
        try:
            with self.decodes.hold(w * h, timeout_s=self.settings.request_timeout_s):
                decode_image(data, max_pixels=self.settings.max_pixels)
        except BudgetTimeoutError as exc:
            raise OverloadedError(
                f"the gateway is decoding too many pixels at once: {exc}",
                retry_after_s=self.settings.retry_after_s,
            ) from None

    def admit(self) -> Admission:
        """The queue depth under which a request is admitted (``butd.service.admission``), from the
        live, non-stuck workers' measured throughput; 503 + Retry-After when none is live.
        Heartbeats are those of ``ModelVersions`` (read at most once a second). The depth is
        checked with the enqueue (``round_trip``)."""
        workers = self.models.loaded_workers()
        if not workers:
            raise OverloadedError(
                "no worker with a loaded model is live", retry_after_s=self.settings.retry_after_s
            )
        s = self.settings
        return admission(
            workers,
            timeout_s=s.request_timeout_s,
            margin=s.admission_margin,
            max_depth=s.max_queue_depth,
        )

    def round_trip(
        self, upload: Upload, request_id: str, admitted: Admission | None = None
    ) -> OnlineResult:
        """Enqueue the upload, unless the online queue is at the admission limit (503 +
        Retry-After), and wait for its worker's answer."""
        timeout = self.settings.request_timeout_s
        request = OnlineRequest(
            request_id=request_id,
            content_sha256=upload.sha256,
            namespace=upload.namespace,
            image_id=upload.image_id,
            options=upload.options,
            deadline_ms=int((time.time() + timeout + self.settings.compute_grace_s) * 1000),
        )
        start, enqueued = time.perf_counter(), time.time()
        admitted = admitted or Admission(self.settings.max_queue_depth, 0.0, timeout)
        depth = self.queue.enqueue_online(request, upload.data, max_depth=admitted.limit)
        if depth is not None:
            self.metrics.refused.inc()
            message, retry_after = admitted.refusal(depth, self.settings.retry_after_s)
            raise OverloadedError(message, retry_after_s=retry_after)
        result = self.queue.wait_result(request_id, timeout)
        self.metrics.online_wait_seconds.observe(time.perf_counter() - start)
        if result is not None:
            self.timings.observe(enqueued, time.time(), result)
        if result is None or result.status == "expired":
            raise ResultTimeoutError(
                f"no worker answered within {timeout:g} s; the result is cached when it "
                f"completes: GET /v1/features/sha256/{upload.sha256}",
                sha256=upload.sha256,
            )
        if result.status == "error":
            raise WorkerError(f"the worker could not extract this image: {result.reason}")
        return result

    def read_result(self, upload: Upload, result: OnlineResult) -> StoredRecord:
        """The record the worker answered with, or (none sent, or no vocabularies published)
        the one it reported stored."""
        version = result.model_version
        meta = None if result.record is None else self.models.meta(version)
        if result.record is not None and meta is not None:
            stored = StoredRecord(
                record=result.record,
                sha256=upload.sha256,
                objects_vocab=meta.objects_vocab,
                attributes_vocab=meta.attributes_vocab,
                description=meta.description,
            )
            alias = (upload.namespace, upload.image_id) if upload.namespace else None
            self.store.remember(version, stored, alias)
            return stored
        stored_or_none = self._stored(version, upload.sha256, wait_s=SEAL_WAIT_S)
        if stored_or_none is None:
            raise ServiceError(
                f"worker reported ({version}, {upload.sha256}) computed, "
                "but the store has no such record"
            )
        return stored_or_none  # the worker bound the alias with the record

    def _stored(self, version: str, sha256: str, *, wait_s: float) -> StoredRecord | None:
        """The stored record, polled for up to ``wait_s`` (the worker seals after answering)."""
        deadline = time.monotonic() + wait_s
        while True:
            stored = self.store.get(version, sha256)
            if stored is not None or time.monotonic() >= deadline:
                return stored
            time.sleep(0.02)


def new_request_id() -> str:
    """A unique id for one HTTP request (and its online queue entry)."""
    return uuid.uuid4().hex
