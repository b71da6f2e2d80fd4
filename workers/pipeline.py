"""The worker's pipeline: load the next piece while the model runs this one; seal behind it.

Three stages, each on its own threads, so the model (the GPU) never waits for the CPU:

1. **Load** (``LoaderPool``, ``PipelinedProcessor``): a thread pool reads, hashes and decodes
   each image (Pillow's decoder and sha256 release the GIL) and stages it for the device
   (``Extractor.stage``: the whole Caffe preparation on a CPU device; the uint8 pixels copied
   into pinned memory on CUDA, sent with a non-blocking copy). A job shard's handler asks for
   piece k+1 (``prefetch``) before running piece k, so its images are ready when the model is.
   An online batch is loaded on all threads at once. Images already stored are not staged.
2. **Model** (the caller's thread, the worker's main loop): ``Processor`` as before, on the
   staged images.
3. **Seal** (``Finisher``, one thread, in order): a job piece's shard is sealed and indexed,
   then its items recorded, and the shard's entry acked after its last piece; the loop goes on
   to the next piece meanwhile (at most ``seal_ahead`` pieces behind). Online batches already
   have their own sealer thread (``butd.workers.sealer``).

Nothing changes in what is computed: a staged image is exactly what ``extract`` would have made
of the decoded one (``tests/integration/test_pipeline.py`` compares the stored records of both
paths bit for bit). Nor in durability: a step runs only after the steps submitted before it,
and once a step of a shard fails, the shard's later steps (its ack above all) are skipped, so
the entry stays pending and is redelivered. ``load_threads = 0`` is the sequential path: plain
``Processor``, seals inline (``InlineSteps``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from butd.store.records import StoredRow
from butd.store.shards import Alias
from butd.workers.batcher import (
    ExtractorLike,
    FeatureSink,
    Loaded,
    Processor,
    Task,
    load_task,
    stored,
)
from butd.workers.files import DEFAULT_LIMITS, ReadLimits
from butd.workers.isolate import Unstored, put_isolated
from butd.workers.sealer import PendingSeals
from butd.workers.settings import WorkerSettings
from butd.workers.sources import FetchFn

log = logging.getLogger(__name__)

Step = Callable[[], object]  # its result is ignored

MAX_AUTO_THREADS = 16  # -1 threads: one per core, at most this many


class InlineSteps:
    """The sequential path's ``Finisher``: each step runs at once; an error propagates."""

    def then(self, step: Step) -> None:
        step()

    @contextlib.contextmanager
    def owner(self, key: str) -> Iterator[None]:
        yield

    def settle(self, key: str) -> bool:
        return True

    def drain(self, timeout_s: float = 60.0) -> bool:
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        return None


class Finisher:
    """Runs steps on one background thread, in the order submitted.

    Steps submitted inside ``owner(key)`` belong to that key (a job shard's entry id). When
    one raises, the key's later steps are skipped (logged): a shard whose piece failed to seal
    is never acked, and is redelivered. The key is forgotten once its ``owner`` block's steps
    have run, so a redelivery starts clean.

    Args:
        depth: steps waiting at most; ``then`` blocks beyond (backpressure on the loop).
    """

    def __init__(self, *, depth: int) -> None:
        self._depth = depth
        self._steps: deque[tuple[str, Step]] = deque()
        self._failed: set[str] = set()
        self._busy = False
        self._stopping = False
        self._key = ""
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="finisher", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def owner(self, key: str) -> Iterator[None]:
        """Steps submitted in this block belong to ``key``."""
        self._key = key
        try:
            yield
        finally:
            self._key = ""
            self.then(lambda: self._forget(key), key="")

    def then(self, step: Step, *, key: str | None = None) -> None:
        """Run ``step`` after every step submitted before it (blocks while ``depth`` wait)."""
        with self._cond:
            while len(self._steps) >= self._depth and self._thread.is_alive():
                self._cond.wait(0.1)
            self._steps.append((self._key if key is None else key, step))
            self._cond.notify_all()

    def settle(self, key: str) -> bool:
        """Wait for the steps submitted so far; False when one of ``key``'s failed."""
        self.drain()
        with self._cond:
            return key not in self._failed

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every submitted step has run; False on timeout or a dead thread."""
        with self._cond:
            end = time.monotonic() + timeout_s
            while self._steps or self._busy:
                left = end - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Run what was submitted, then stop the thread."""
        self.drain(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    def _forget(self, key: str) -> None:
        with self._cond:
            self._failed.discard(key)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._steps and not self._stopping:
                    self._cond.wait()
                if not self._steps:
                    return
                key, step = self._steps.popleft()
                self._busy = True
                skip = key in self._failed
                self._cond.notify_all()
            try:
                if skip:
                    log.warning("skipped a step of %s: an earlier step failed", key)
                else:
                    step()
            except Exception:  # the shard stays pending: reclaimed, recomputed, sealed
                log.exception("a step of %s failed; its entry stays pending", key or "-")
                with self._cond:
                    if key:
                        self._failed.add(key)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


class DeferredSink:
    """The job ``Processor``'s sink in the pipeline: each put becomes a ``Finisher`` step that
    stores the rows (seals and indexes them) in order, before the piece's later steps.

    ``has`` also answers for records computed and waiting for their seal, so the same bytes
    met again meanwhile (a duplicate in the next piece) are not computed twice.
    """

    def __init__(self, sink: FeatureSink, finisher: Finisher) -> None:
        self.sink = sink
        self.finisher = finisher
        self._pending = PendingSeals()
        self._unstored = Unstored()

    def take_unstored(self) -> Unstored:
        """What the seals run since the last call could not store (finisher thread)."""
        lost, self._unstored = self._unstored, Unstored()
        return lost

    def has(self, model_version: str, sha256: str) -> bool:
        return self._pending.has(self.sink, model_version, sha256)

    def has_many(self, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        return self._pending.has_many(self.sink, model_version, sha256s)

    def put(
        self,
        name: str,
        rows: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        """Queue the rows' seal (sealed and indexed by the finisher thread, in order); nothing
        is written yet."""
        keys = [(model_version, r.content_sha256) for r in rows]
        rows, aliases = tuple(rows), tuple(aliases)
        self._pending.add(keys)

        def step() -> None:
            # An unstorable record fails alone (butd.workers.isolate); the piece's record sees it.
            try:
                lost = put_isolated(self.sink, name, rows, model_version, config, aliases)
                self._unstored.records.update(lost.records)
                self._unstored.aliases.update(lost.aliases)
            finally:
                self._pending.release(keys)

        self.finisher.then(step)


class SerialSink:
    """A sink whose puts run one at a time (the online sealer and the finisher share it)."""

    def __init__(self, sink: FeatureSink) -> None:
        self.sink = sink
        self._lock = threading.Lock()

    def has(self, model_version: str, sha256: str) -> bool:
        return self.sink.has(model_version, sha256)

    def has_many(self, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        return stored(self.sink, model_version, sha256s)

    def put(
        self,
        name: str,
        rows: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        """``put`` in the wrapped sink, one call at a time."""
        with self._lock:
            self.sink.put(name, rows, model_version, config, aliases)


class PipelinedProcessor(Processor):
    """A ``Processor`` whose loads run on a shared thread pool, started ahead by ``prefetch``.

    Args:
        extractor: the loaded model; its ``stage`` (if it has one) runs on the loader threads.
        sink: the feature store (or a deferring / collecting stand-in for it).
        fetch: reads an uploaded image's bytes from Redis by key.
        pool: the loader threads (shared by the worker's processors).
        max_pixels: largest image decoded, pixels.
        limits: the read timeout and size cap of job files.
    """

    def __init__(
        self,
        extractor: ExtractorLike,
        sink: FeatureSink,
        fetch: FetchFn,
        *,
        pool: ThreadPoolExecutor,
        max_pixels: int,
        limits: ReadLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(extractor, sink, fetch, max_pixels=max_pixels, limits=limits)
        self.pool = pool
        self._stage: Callable[..., Any] | None = getattr(extractor, "stage", None)
        self._ahead: list[tuple[Task, Future[Loaded]]] = []

    def prefetch(self, tasks: Sequence[Task]) -> None:
        """Start loading ``tasks`` (the next ``run``'s); anything prefetched before is dropped."""
        self._drop_ahead()
        self._ahead = [(t, self.pool.submit(self._load_one, t)) for t in tasks]

    def load(self, tasks: Sequence[Task]) -> list[Loaded]:
        """Each task loaded: prefetched ones as they finish, the others on the pool now."""
        ahead = {id(t): (t, f) for t, f in self._ahead}
        self._ahead = []
        futures = []
        for task in tasks:
            hit = ahead.pop(id(task), None)
            if hit is None or hit[0] is not task:
                hit = (task, self.pool.submit(self._load_one, task))
            futures.append(hit[1])
        for _, stale in ahead.values():
            stale.cancel()
        return [f.result() for f in futures]

    def _drop_ahead(self) -> None:
        for _, future in self._ahead:
            future.cancel()
        self._ahead = []

    def _load_one(self, task: Task) -> Loaded:
        """Read, hash, decode (``load_task``), then stage unless stored or unconfigurable."""
        loaded = load_task(task, self.fetch, max_pixels=self.max_pixels, limits=self.limits)
        if self._stage is None or loaded.image is None:
            return loaded
        try:
            config = self.config_for(task.options)
            if self.sink.has(self.extractor.version_for(config), loaded.content_sha256):
                return loaded
            return replace(loaded, staged=self._stage(loaded.image, config))
        except Exception as exc:  # the main loop meets the same problem and reports it
            log.debug("staging %s failed (%r); left to the main loop", task.image_id, exc)
            return loaded


class Pipeline:
    """The worker's processors and finisher, as ``settings`` ask (``load_threads``).

    Args:
        settings: ``load_threads``, ``seal_ahead``, ``max_pixels`` are read.
        extractor: the loaded model.
        sink: the real feature store.
        fetch: reads an uploaded image's bytes from Redis by key.
        limits: the read timeout and size cap of job files.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        extractor: ExtractorLike,
        sink: FeatureSink,
        fetch: FetchFn,
        *,
        limits: ReadLimits = DEFAULT_LIMITS,
    ) -> None:
        self.limits = limits
        self.threads = loader_threads(settings.load_threads)
        self.extractor = extractor
        self.fetch = fetch
        self.max_pixels = settings.max_pixels
        self.pool: ThreadPoolExecutor | None = None
        self.finisher: Finisher | InlineSteps = InlineSteps()
        self.sink: FeatureSink = sink
        self.jobs_sink: FeatureSink = sink
        if self.threads:
            self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="loader")
            self.finisher = Finisher(depth=2 * settings.seal_ahead)  # a seal and a record each
            self.sink = SerialSink(sink)
            self.jobs_sink = DeferredSink(self.sink, self.finisher)
        log.info("pipeline: %d loader threads", self.threads)

    def processor(self, sink: FeatureSink) -> Processor:
        """A processor writing to ``sink``: pipelined, or the plain one when sequential."""
        if self.pool is None:
            return Processor(
                self.extractor, sink, self.fetch, max_pixels=self.max_pixels, limits=self.limits
            )
        return PipelinedProcessor(
            self.extractor,
            sink,
            self.fetch,
            pool=self.pool,
            max_pixels=self.max_pixels,
            limits=self.limits,
        )

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait for every job piece handed to the finisher (before re-reading own entries)."""
        return self.finisher.drain(timeout_s)

    def close(self) -> None:
        """Finish what was handed over, then stop the threads."""
        self.finisher.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def loader_threads(setting: int) -> int:
    """``load_threads`` resolved: -1 = one per CPU core available, at most 16."""
    if setting >= 0:
        return setting
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(MAX_AUTO_THREADS, cores))
