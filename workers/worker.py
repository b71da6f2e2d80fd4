"""The worker process: one per GPU (or CPU), owning one loaded model, draining the streams.

This module holds the loop (``Worker``: when to read, recover, run the janitor, serve online
entries before job shards, stop) and its construction (``build_worker``, ``main``: the
``python -m butd.workers.worker`` entry point). What is done with one online batch, one job shard
or one dead letter is ``butd.workers.handlers``.

Main loop (``Worker.step``), reading like the data flow:

1. After a start or a Redis outage: re-create the group if Redis lost it, re-read this
   consumer's own pending entries (id 0) and process them (dead-lettering over-delivered ones).
2. Every ``janitor_interval_s``: reclaim entries idle past ``claim_idle_ms``, dead-letter
   poison ones, trim acknowledged ones (``butd.workers.janitor``).
3. Block up to ``idle_block_ms`` for one online entry and one job shard at once.
4. Online entries first: top the batch up with entries already queued (and, during a burst, up
   to ``batch_size`` within ``batch_wait_ms``), then handle it ``batch_size`` at a time
   (``handlers.OnlineHandler``: drop expired ones, extract, answer, hand to the sealer thread,
   which seals, indexes and XACKs it).
5. A job shard (``handlers.ShardHandler``): processed ``batch_size`` images at a time; between
   pieces the loop serves the online entries waiting then.

A handler that raises anything but a Redis error leaves its entries pending for the janitor.
SIGTERM / SIGINT: stop reading, finish the batch in hand, ack, exit 0. Redis errors: back off
(0.1 s doubling to ``reconnect_max_s``) and reconnect; pending entries survive in the PEL.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from butd.store.index import FeatureIndex
from butd.store.shard_store import StoreWriter
from butd.workers import queue as q
from butd.workers.batcher import ExtractorLike, FeatureSink, chunks, fill_batch
from butd.workers.files import ReadLimits
from butd.workers.handlers import Counters, OnlineHandler, ShardHandler, fail_dead
from butd.workers.heads_task import start_heads
from butd.workers.janitor import HeartbeatThread, Janitor
from butd.workers.memory import trim_heap
from butd.workers.pipeline import Pipeline
from butd.workers.protocol import JOBS_STREAM, ONLINE_STREAM, STREAMS, Heartbeat
from butd.workers.replies import Replies
from butd.workers.sealer import Sealer
from butd.workers.settings import WorkerSettings
from butd.workers.wire import ModelMeta

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


class Worker:
    """Drains ``butd:online`` and ``butd:jobs`` with one loaded model.

    The loop decides what to handle when; ``handle_online`` and ``handle_shard``
    (``butd.workers.handlers``) do the work, sharing ``counters`` for the heartbeat.

    Args:
        settings: worker settings.
        extractor: the loaded model (``butd.detector.extractor.Extractor`` or a fake).
        sink: the feature store.
        device: device description for the heartbeat.
        model: model description for the heartbeat.
        client: Redis client (default: ``connect(settings.redis_url)``).
        model_meta: vocabularies and description, published under ``model_key(version)`` for
            the gateway to render answered records with (None: not published).
        feature_dtype: the store's feature dtype; answered records are cast to it.
        heads: tasks served by this process's heads thread (``butd.workers.heads_task``).
    """

    def __init__(
        self,
        settings: WorkerSettings,
        extractor: ExtractorLike,
        sink: FeatureSink,
        *,
        device: str = "cpu",
        model: str = "",
        client: Client | None = None,
        model_meta: ModelMeta | None = None,
        feature_dtype: str = "float16",
        heads: Sequence[str] = (),
    ) -> None:
        self.s = settings
        self.r = client if client is not None else q.connect(settings.redis_url)
        self.consumer = settings.worker_id
        limits = ReadLimits(settings.read_timeout_s, settings.max_file_bytes)
        # Loader threads ahead of the model, job seals behind it (workers/pipeline.py).
        self.pipeline = Pipeline(settings, extractor, sink, self._fetch, limits=limits)
        self.processor = self.pipeline.processor(self.pipeline.jobs_sink)
        self.janitor = Janitor(
            self.consumer,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            interval_s=settings.janitor_interval_s,
            trim_keep_ms=settings.trim_keep_ms,
            claim_counts={ONLINE_STREAM: settings.batch_size, JOBS_STREAM: 1},
            on_dead=functools.partial(fail_dead, self.r),
        )
        self.counters = Counters()
        self.replies = Replies(
            self.r,
            result_ttl_s=settings.result_ttl_s,
            model_meta=model_meta,
            feature_dtype=feature_dtype,
        )
        self.sealer = Sealer(
            self.pipeline.sink, self.replies.finish, linger_s=settings.seal_linger_ms / 1000.0
        )
        self.online = self.pipeline.processor(self.sealer)
        self.stopping = threading.Event()
        self.handle_online = OnlineHandler(
            self.r, self.consumer, self.online, self.replies, self.sealer, self.counters
        )
        self.handle_shard = ShardHandler(
            self.r,
            self.consumer,
            self.processor,
            self.counters,
            batch_size=settings.batch_size,
            stopping=self.stopping,
            between_pieces=self._serve_online_now,
            finisher=self.pipeline.finisher,
        )
        self._recover = True
        version = extractor.version_for(extractor.config)
        self._beat = Heartbeat(
            self.consumer,
            socket.gethostname(),
            os.getpid(),
            device,
            version,
            model,
            True,
            heads=tuple(heads),
        )

    # -- process lifecycle -----------------------------------------------------------------

    def heartbeat(self) -> Heartbeat:
        """The current heartbeat record."""
        c = self.counters
        return replace(
            self._beat,
            batches=c.batches,
            images=c.images,
            errors=c.errors,
            updated_at=time.time(),
            progress_at=c.progress_at,
            stall_after_s=self.s.stall_after_s,
            working_on=c.working_on,
            seconds_per_image=round(c.seconds_per_image, 6),
        )

    def request_stop(self, signum: int = signal.SIGTERM, frame: FrameType | None = None) -> None:
        """Finish the batch in hand, then leave ``run`` (signal handler)."""
        log.info("worker %s: signal %d, stopping after the batch in hand", self.consumer, signum)
        self.stopping.set()

    def run(self) -> int:
        """Serve until ``request_stop``; returns the exit status (0)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.request_stop)
        self._beat = replace(self._beat, started_at=time.time())
        beat = HeartbeatThread(
            self.s.redis_url, self.heartbeat, self.s.heartbeat_s, self.s.heartbeat_ttl_s
        )
        beat.start()
        log.info("worker %s: serving, model %s", self.consumer, self._beat.model_version)
        try:
            self._serve()
        finally:
            self.sealer.close()
            self.pipeline.close()
            beat.stop(self.consumer)
        log.info("worker %s stopped: %s", self.consumer, self.counters)
        return 0

    def _serve(self) -> None:
        """``step`` until stopped; a Redis outage is logged once and retried with backoff."""
        delay, down_since = 0.1, 0.0
        while not self.stopping.is_set():
            try:
                self.step()
            except REDIS_DOWN as exc:
                if not down_since:
                    down_since = time.monotonic()
                    log.warning(
                        "worker %s: redis unreachable (%s); reconnecting", self.consumer, exc
                    )
                self._recover = True
                self.stopping.wait(delay)
                delay = min(delay * 2, self.s.reconnect_max_s)
                continue
            if down_since:
                outage = time.monotonic() - down_since
                log.info("worker %s: redis back after %.1fs", self.consumer, outage)
                delay, down_since = 0.1, 0.0

    def step(self) -> None:
        """One turn of the main loop (see the module docstring)."""
        self.counters.tick()
        if self._recover:
            self.sealer.drain()  # what it acks is not "own pending" to redo
            self.pipeline.drain()  # nor the job pieces still being sealed
            q.ensure_groups(self.r)
            own = q.read_entries(self.r, STREAMS, self.consumer, count=1000, pending=True)
            self._recover = False
            if own:
                log.info("worker %s: %d own pending entries to finish", self.consumer, len(own))
            self._dispatch(self.janitor.screen(self.r, own), redelivered=True)
        if self.janitor.due():
            self._dispatch(self.janitor.run(self.r), redelivered=True)
        if self.stopping.is_set():
            return
        first = q.read_entries(
            self.r, STREAMS, self.consumer, count=1, block_ms=self.s.idle_block_ms
        )
        self._dispatch(first, fill=True)

    def _dispatch(
        self, entries: Sequence[q.Entry], *, fill: bool = False, redelivered: bool = False
    ) -> None:
        online = [e for e in entries if e.stream == ONLINE_STREAM]
        if online:
            self._serve_online(online, fill=fill, redelivered=redelivered)
        for entry in entries:
            if entry.stream == JOBS_STREAM:
                self._guard(self.handle_shard, entry)

    def _guard(self, handler: Callable[[Any], None], arg: Any) -> None:
        """Run a handler; an unexpected error leaves its entries pending for the janitor.

        The loop's progress marks (``Counters.tick``) bracket it, and the heap is trimmed after
        it (``butd.workers.memory``)."""
        self.counters.tick(_describe(arg))
        try:
            handler(arg)
        except REDIS_DOWN:
            raise
        except Exception:
            self.counters.errors += 1
            log.exception("worker %s: handler failed; entries stay pending", self.consumer)
        finally:
            self.counters.tick("")
            if self.s.malloc_trim:
                trim_heap()

    def _fetch(self, key: str) -> bytes | None:
        data = self.r.get(key)
        if isinstance(data, str):
            raise TypeError(f"{key} came back as str; the worker's client must reply bytes")
        return data

    # -- online ----------------------------------------------------------------------------

    def _serve_online(
        self, entries: Sequence[q.Entry], *, fill: bool, redelivered: bool = False
    ) -> None:
        size = self.s.batch_size
        if fill and len(entries) < size:
            entries = fill_batch(
                entries, self._read_online, max_items=size, max_wait_ms=self.s.batch_wait_ms
            )
        handle = functools.partial(self.handle_online, redelivered=redelivered)
        for piece in chunks(len(entries), size):
            self._guard(handle, [entries[i] for i in piece])

    def _read_online(self, count: int, block_ms: int) -> list[q.Entry]:
        """Up to ``count`` new online entries, waiting ``block_ms`` (0: only those queued)."""
        return q.read_entries(
            self.r, [ONLINE_STREAM], self.consumer, count=count, block_ms=block_ms or None
        )

    def _serve_online_now(self) -> None:
        """Between pieces of a long shard: online entries waiting right now, and those of dead
        or stuck workers when the janitor is due (job shards wait for the next full run)."""
        self.counters.tick()
        working_on = self.counters.working_on
        if self.janitor.due():
            reclaimed = self.janitor.run(self.r, streams=(ONLINE_STREAM,))
            if reclaimed:
                self._serve_online(reclaimed, fill=False, redelivered=True)
        waiting = q.read_entries(self.r, [ONLINE_STREAM], self.consumer, count=self.s.batch_size)
        if waiting:
            self._serve_online(waiting, fill=False)
        self.counters.tick(working_on)


def _describe(arg: Any) -> str:
    """What a handler works on, for the heartbeat: "STREAM ID[ +N more]"."""
    entries = list(arg) if isinstance(arg, list | tuple) else [arg]
    if not entries or not isinstance(entries[0], q.Entry):
        return ""
    more = f" +{len(entries) - 1} more" if len(entries) > 1 else ""
    return f"{entries[0].stream} {entries[0].entry_id}{more}"


def build_worker(settings: WorkerSettings) -> Worker:
    """Load the model and open the store named by ``settings`` (imports torch)."""
    # Imported by name: torch stays out of this module's import graph (and out of mypy's).
    extractor_cls: Any = importlib.import_module("butd.detector.extractor").Extractor

    device = settings.torch_device()
    start = time.perf_counter()
    extractor = extractor_cls.from_weights(
        settings.weights,
        device=device,
        batch_size=settings.batch_size,
        **{"precision": settings.precision, **settings.extraction},
    )
    took = time.perf_counter() - start
    log.info(
        "loaded %s (%s) on %s in %.1fs", settings.weights, extractor.model_version, device, took
    )
    spec = extractor.spec
    client = q.connect(settings.redis_url)
    sink = StoreWriter(
        settings.store_dir,
        FeatureIndex(client),
        writer_id=settings.worker_id,
        meta={
            "objects_vocab": spec.objects_vocab,
            "attributes_vocab": spec.attributes_vocab,
            "feature_dim": spec.arch.feature_dim,
        },
        store_url=settings.store_url,
    )
    meta = ModelMeta(tuple(spec.objects_vocab), tuple(spec.attributes_vocab), spec.description)
    heads = start_heads(settings, device=device)  # on the extractor's device
    return Worker(
        settings,
        extractor,
        sink,
        device=device,
        model=spec.description,
        client=client,
        model_meta=meta,
        heads=sorted(heads.heads) if heads else (),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m butd.workers.worker``: settings from the environment only."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return build_worker(WorkerSettings()).run()


if __name__ == "__main__":
    raise SystemExit(main())
