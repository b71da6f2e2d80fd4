"""The worker process: one per GPU (or CPU), owning one loaded model, draining the streams.

Main loop (``Worker.step``), reading like the data flow:

1. After a start or a Redis outage: re-create the group if Redis lost it, re-read this
   consumer's own pending entries (id 0) and process them (dead-lettering over-delivered ones).
2. Every ``janitor_interval_s``: reclaim entries idle past ``claim_idle_ms``, dead-letter
   poison ones, trim acknowledged ones (``workers.janitor``).
3. Block up to ``idle_block_ms`` for one online entry and one job shard at once.
4. Online entries first: top the batch up with entries already queued (and, during a burst, up
   to ``batch_size`` within ``batch_wait_ms``), drop expired ones ("expired"), load /
   skip-cached / extract (``Processor``), LPUSH each result with its record, then hand the
   batch to the sealer thread, which seals, indexes and XACKs it (reply before seal: a crash
   in between leaves the entries to be redelivered).
5. A job shard: skip it if its job was cancelled; otherwise process it ``batch_size`` images at
   a time, recording progress after each sealed piece and acking after the last. Between pieces
   the worker serves waiting online entries, refreshes its claim on the shard and, on SIGTERM,
   hands the rest of the shard back to the stream.

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
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis

from store.index import FeatureIndex
from workers import queue as q
from workers.batcher import (
    ExtractorLike,
    FeatureSink,
    Outcome,
    Processor,
    Task,
    chunks,
    fill_batch,
    tasks_from_online,
    tasks_from_shard,
)
from workers.heads_task import start_heads
from workers.janitor import HeartbeatThread, Janitor
from workers.protocol import (
    JOBS_STREAM,
    ONLINE_STREAM,
    STREAMS,
    Heartbeat,
    JobShard,
    OnlineRequest,
    OnlineResult,
    ProtocolError,
)
from workers.replies import Replies, online_result
from workers.sealer import Sealer
from workers.settings import WorkerSettings
from workers.sink import StoreSink
from workers.wire import ModelMeta

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)

REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)


@dataclass
class Counters:
    """Since start: model batches run, images processed, items failed, handler crashes."""

    batches: int = 0
    images: int = 0
    errors: int = 0


class Worker:
    """Drains ``butd:online`` and ``butd:jobs`` with one loaded model.

    Args:
        settings: worker settings.
        extractor: the loaded model (``detector.extractor.Extractor`` or a fake).
        sink: the feature store.
        device: device description for the heartbeat.
        model: model description for the heartbeat.
        client: Redis client (default: ``connect(settings.redis_url)``).
        model_meta: vocabularies and description, published under ``model_key(version)`` for
            the gateway to render answered records with (None: not published).
        feature_dtype: the store's feature dtype; answered records are cast to it.
        heads: tasks served by this process's heads thread (``workers.heads_task``).
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
        self.processor = Processor(extractor, sink, self._fetch, max_pixels=settings.max_pixels)
        self.janitor = Janitor(
            self.consumer,
            claim_idle_ms=settings.claim_idle_ms,
            max_deliveries=settings.max_deliveries,
            interval_s=settings.janitor_interval_s,
            trim_keep_ms=settings.trim_keep_ms,
            claim_counts={ONLINE_STREAM: settings.batch_size, JOBS_STREAM: 1},
            on_dead=self._on_dead,
        )
        self.counters = Counters()
        self.replies = Replies(
            self.r,
            result_ttl_s=settings.result_ttl_s,
            model_meta=model_meta,
            feature_dtype=feature_dtype,
        )
        self.sealer = Sealer(sink, self.replies.finish, linger_s=settings.seal_linger_ms / 1000.0)
        self.online = Processor(extractor, self.sealer, self._fetch, max_pixels=settings.max_pixels)
        self.stopping = threading.Event()
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
            self._beat, batches=c.batches, images=c.images, errors=c.errors, updated_at=time.time()
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
        if self._recover:
            self.sealer.drain()  # what it acks is not "own pending" to redo
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
        """Run a handler; an unexpected error leaves its entries pending for the janitor."""
        try:
            handler(arg)
        except REDIS_DOWN:
            raise
        except Exception:
            self.counters.errors += 1
            log.exception("worker %s: handler failed; entries stay pending", self.consumer)

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
        """Online entries waiting right now (called between pieces of a long shard)."""
        waiting = q.read_entries(self.r, [ONLINE_STREAM], self.consumer, count=self.s.batch_size)
        if waiting:
            self._serve_online(waiting, fill=False)

    def handle_online(self, entries: Sequence[q.Entry], *, redelivered: bool = False) -> None:
        """Compute one batch, answer each request with its record, then have it sealed and acked.

        Reply before seal (``workers.replies``): the records are pushed to the waiting
        gateways as soon as they are computed; the sealer thread then seals and indexes them,
        and only then acks the entries (``workers.sealer``). A crash in between leaves them
        pending: redelivered, they are computed again and sealed (at-least-once caching). A
        fresh entry past its deadline is answered "expired" without computing; a redelivered
        one is computed and sealed without an answer (nobody waits for it any more).
        """
        t_batch = time.time()
        now_ms = int(t_batch * 1000)
        finished: list[tuple[q.Entry, OnlineResult | None]] = []
        tasks: list[Task] = []
        for entry in entries:
            try:
                task = tasks_from_online(entry)
            except ProtocolError as exc:
                self._reject_online(entry, str(exc))
                continue
            if task.expired(now_ms) and not redelivered:
                late = now_ms - task.deadline_ms
                reason = f"deadline passed {late} ms before a worker reached the request"
                finished.append((entry, OnlineResult(task.request_id, "expired", reason=reason)))
            else:
                tasks.append(task)
        quiet = {t.entry.entry_id for t in tasks if t.expired(now_ms)}
        answered: set[str] = set(quiet)
        t_answered = t_batch
        if tasks:

            def answer(outcomes: list[Outcome]) -> None:
                nonlocal t_answered
                answered.update(self.replies.answer(outcomes, t_batch, quiet))
                t_answered = time.time()

            outcomes = self.online.run(tasks, f"online-{tasks[0].entry.entry_id}", answer)
            self._count(outcomes)
            finished += [
                (o.task.entry, None if o.task.entry.entry_id in answered else online_result(o))
                for o in outcomes
            ]
        self.sealer.submit(finished)
        log.info(
            "online batch: %d entries, answered after %.1f ms, handed to the sealer after %.1f ms",
            len(entries),
            1e3 * (t_answered - t_batch),
            1e3 * (time.time() - t_batch),
        )

    def _reject_online(self, entry: q.Entry, reason: str) -> None:
        """A malformed online entry: report it if it has a request id, dead-letter it."""
        log.error("worker %s: malformed online entry %s: %s", self.consumer, entry.entry_id, reason)
        request_id = (entry.fields or {}).get("request_id")
        if request_id:
            q.post_result(self.r, OnlineResult(request_id, "error", reason=reason))
        q.dead_letter(self.r, entry, 1, f"malformed entry: {reason}")

    # -- jobs ------------------------------------------------------------------------------

    def handle_shard(self, entry: q.Entry) -> None:
        """Process one job shard piece by piece; ack after the last piece is recorded."""
        try:
            shard, tasks = tasks_from_shard(entry)
        except ProtocolError as exc:
            log.error("worker %s: malformed shard %s: %s", self.consumer, entry.entry_id, exc)
            q.dead_letter(self.r, entry, 1, f"malformed entry: {exc}")
            return
        start = time.perf_counter()
        pieces = chunks(len(tasks), self.s.batch_size)
        for k, piece in enumerate(pieces):
            state = q.mark_job_started(self.r, shard.job_id)
            if state is None or state == "cancelled":
                log.info("job %s shard %d: job %s, skipped", shard.job_id, shard.shard_no, state)
                break
            if k > 0 and self.stopping.is_set():
                self._hand_off(entry, shard, piece.start)
                return
            if k > 0:
                q.touch(self.r, entry, self.consumer)
                self._serve_online_now()
            name = f"job-{shard.job_id}-{shard.shard_no}-{entry.entry_id}-{k}"
            outcomes = self.processor.run([tasks[i] for i in piece], name)
            self._count(outcomes)
            done = [o.task.image_id for o in outcomes if o.ok]
            failed = {o.task.image_id: o.reason for o in outcomes if not o.ok}
            q.record_items(self.r, shard.job_id, done, failed)
        q.ack(self.r, entry.stream, [entry.entry_id])
        took = time.perf_counter() - start
        log.info(
            "job %s shard %d: %d items in %.3fs", shard.job_id, shard.shard_no, len(tasks), took
        )

    def _hand_off(self, entry: q.Entry, shard: JobShard, start: int) -> None:
        rest = replace(shard, items=shard.items[start:])
        q.hand_off(self.r, entry, rest)
        n = len(rest.items)
        log.info("job %s shard %d: stopping, handed %d items back", shard.job_id, shard.shard_no, n)

    # -- janitor callback ------------------------------------------------------------------

    def _on_dead(self, entry: q.Entry, deliveries: int, reason: str) -> None:
        """Fail a dead-lettered entry's online request or job items with ``reason``."""
        try:
            if entry.stream == ONLINE_STREAM:
                req = OnlineRequest.from_fields(entry.fields or {})
                q.post_result(self.r, OnlineResult(req.request_id, "error", reason=reason))
            else:
                shard = JobShard.from_fields(entry.fields or {})
                failed = {item.image_id: reason for item in shard.items}
                q.record_items(self.r, shard.job_id, [], failed)
        except ProtocolError as exc:
            log.error("dead entry %s is malformed (%s); nobody to tell", entry.entry_id, exc)

    def _count(self, outcomes: Sequence[Outcome]) -> None:
        self.counters.batches += 1
        self.counters.images += len(outcomes)
        self.counters.errors += sum(not o.ok for o in outcomes)


def build_worker(settings: WorkerSettings) -> Worker:
    """Load the model and open the store named by ``settings`` (imports torch)."""
    # Imported by name: torch stays out of this module's import graph (and out of mypy's).
    extractor_cls: Any = importlib.import_module("detector.extractor").Extractor

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
    sink = StoreSink(
        settings.store_dir,
        FeatureIndex(client),
        worker_id=settings.worker_id,
        meta={
            "objects_vocab": spec.objects_vocab,
            "attributes_vocab": spec.attributes_vocab,
            "feature_dim": spec.arch.feature_dim,
        },
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
    """``python -m workers.worker``: settings from the environment only."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return build_worker(WorkerSettings()).run()


if __name__ == "__main__":
    raise SystemExit(main())
