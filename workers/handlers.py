"""What a worker does with one unit of work: an online batch, a job shard, a dead letter.

The loop that reads the streams and decides what to handle when is ``butd.workers.worker``; each
handler here takes the entries it is given to the end:

* ``OnlineHandler``: one online batch. Malformed entries are answered "error" and
  dead-lettered; fresh ones past their deadline are answered "expired" without computing; the
  rest are loaded / skipped if cached / extracted (``butd.workers.batcher.Processor``), each record
  is answered first (``butd.workers.replies``), then the batch goes to the sealer thread, which
  seals, indexes and acks it (``butd.workers.sealer``).
* ``ShardHandler``: one job shard, ``batch_size`` images a piece. Progress is recorded after
  each sealed piece and the entry acked after the last; between pieces it serves waiting online
  entries (a callback into the loop), refreshes its claim on the shard, skips the rest of a
  cancelled job and, once the worker is stopping, hands the unstarted rest back to the stream.
* ``fail_dead``: the janitor's callback for a dead-lettered entry: fails its online request or
  its job items with the reason.
* ``Counters``: batches, images and failed items since start, for the heartbeat.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, ClassVar

import redis

from butd.workers import queue as q
from butd.workers.batcher import (
    Processor,
    Task,
    chunks,
    tasks_from_online,
    tasks_from_shard,
)
from butd.workers.outcomes import Failed, Outcome
from butd.workers.pipeline import Finisher, InlineSteps
from butd.workers.protocol import (
    ONLINE_STREAM,
    JobShard,
    OnlineRequest,
    OnlineResult,
    ProtocolError,
)
from butd.workers.replies import Replies, online_result
from butd.workers.sealer import Sealer

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)


@dataclass
class Counters:
    """Since start: model batches run, images processed, items failed, handler crashes; and
    the main loop's progress (``tick``), published in the heartbeat.

    Attributes:
        progress_at: epoch seconds of the loop's last tick or counted batch.
        working_on: what the loop is handling now ("" when idle).
        seconds_per_image: moving average (weight ``SPI_WEIGHT`` per batch) of a batch's
            seconds divided by its images; 0 until the first timed batch.
    """

    batches: int = 0
    images: int = 0
    errors: int = 0
    progress_at: float = field(default_factory=time.time)
    working_on: str = ""
    seconds_per_image: float = 0.0

    SPI_WEIGHT: ClassVar[float] = 0.2

    def tick(self, working_on: str | None = None) -> None:
        """The loop moved (and, when given, now handles ``working_on``)."""
        self.progress_at = time.time()
        if working_on is not None:
            self.working_on = working_on

    def count(self, outcomes: Sequence[Outcome], seconds: float | None = None) -> None:
        """Add one model batch and its outcomes (a failed outcome counts as an error) and,
        with ``seconds`` (the batch's duration), update ``seconds_per_image``."""
        self.batches += 1
        self.images += len(outcomes)
        self.errors += sum(isinstance(o, Failed) for o in outcomes)
        if seconds is not None and outcomes:
            spi = seconds / len(outcomes)
            old = self.seconds_per_image
            self.seconds_per_image = spi if old == 0 else old + self.SPI_WEIGHT * (spi - old)
        self.tick()


class OnlineHandler:
    """Computes one online batch, answers each request with its record, hands it to the sealer.

    Args:
        client: Redis client (bytes replies).
        consumer: the worker's consumer name, for the log.
        processor: the online ``Processor``, whose sink is ``sealer``.
        replies: answers the waiting gateways.
        sealer: seals, indexes and acks the answered batch on its own thread.
        counters: the worker's counters.
    """

    def __init__(
        self,
        client: Client,
        consumer: str,
        processor: Processor,
        replies: Replies,
        sealer: Sealer,
        counters: Counters,
    ) -> None:
        self.r = client
        self.consumer = consumer
        self.processor = processor
        self.replies = replies
        self.sealer = sealer
        self.counters = counters

    def __call__(self, entries: Sequence[q.Entry], *, redelivered: bool = False) -> None:
        """Compute one batch, answer each request with its record, then have it sealed and acked.

        Reply before seal (``butd.workers.replies``): the records are pushed to the waiting
        gateways as soon as they are computed; the sealer thread then seals and indexes them,
        and only then acks the entries (``butd.workers.sealer``). A crash in between leaves them
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
                self._reject(entry, str(exc))
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

            outcomes = self.processor.run(tasks, f"online-{tasks[0].entry.entry_id}", answer)
            self.counters.count(outcomes, time.time() - t_batch)
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

    def _reject(self, entry: q.Entry, reason: str) -> None:
        """A malformed online entry: report it if it has a request id, dead-letter it."""
        log.error("worker %s: malformed online entry %s: %s", self.consumer, entry.entry_id, reason)
        request_id = (entry.fields or {}).get("request_id")
        if request_id:
            q.post_result(self.r, OnlineResult(request_id, "error", reason=reason))
        q.dead_letter(self.r, entry, 1, f"malformed entry: {reason}")


class ShardHandler:
    """Processes one job shard piece by piece; acks it after the last piece is recorded.

    Args:
        client: Redis client.
        consumer: the worker's consumer name (claim refreshes, the log).
        processor: the job ``Processor``, whose sink seals and indexes each piece.
        counters: the worker's counters.
        batch_size: images per piece (one model call each).
        stopping: set once the worker is stopping: the unstarted rest is handed back.
        between_pieces: called before every piece but the first (the loop serves the online
            entries waiting then).
        finisher: runs what follows a piece's computation (its seal, through the processor's
            sink, the progress record, the final ack) in order: on the pipeline's thread
            (``butd.workers.pipeline.Finisher``) or at once (default).
    """

    def __init__(
        self,
        client: Client,
        consumer: str,
        processor: Processor,
        counters: Counters,
        *,
        batch_size: int,
        stopping: threading.Event,
        between_pieces: Callable[[], None],
        finisher: Finisher | InlineSteps | None = None,
    ) -> None:
        self.r = client
        self.consumer = consumer
        self.processor = processor
        self.counters = counters
        self.batch_size = batch_size
        self.stopping = stopping
        self.between_pieces = between_pieces
        self.finisher = finisher or InlineSteps()

    def __call__(self, entry: q.Entry) -> None:
        """Process one job shard piece by piece; ack after the last piece is recorded."""
        try:
            shard, tasks = tasks_from_shard(entry)
        except ProtocolError as exc:
            log.error("worker %s: malformed shard %s: %s", self.consumer, entry.entry_id, exc)
            q.dead_letter(self.r, entry, 1, f"malformed entry: {exc}")
            return
        start = time.perf_counter()
        with self.finisher.owner(entry.entry_id):
            if self._pieces(entry, shard, tasks):
                self.finisher.then(functools.partial(q.ack, self.r, entry.stream, [entry.entry_id]))
        took = time.perf_counter() - start
        log.info(
            "job %s shard %d: %d items in %.3fs", shard.job_id, shard.shard_no, len(tasks), took
        )

    def _pieces(self, entry: q.Entry, shard: JobShard, tasks: list[Task]) -> bool:
        """Run the shard's pieces; False when the rest was handed back (no ack then)."""
        pieces = chunks(len(tasks), self.batch_size)
        for k, piece in enumerate(pieces):
            state = q.mark_job_started(self.r, shard.job_id)
            if state is None or state == "cancelled":
                log.info("job %s shard %d: job %s, skipped", shard.job_id, shard.shard_no, state)
                break
            if k > 0 and self.stopping.is_set():
                if self.finisher.settle(entry.entry_id):  # earlier pieces sealed first
                    self._hand_off(entry, shard, piece.start)
                return False
            if k > 0:
                q.touch(self.r, entry, self.consumer)
                self.between_pieces()
            if k + 1 < len(pieces):
                self.processor.prefetch([tasks[i] for i in pieces[k + 1]])
            name = f"job-{shard.job_id}-{shard.shard_no}-{entry.entry_id}-{k}"
            t_piece = time.perf_counter()
            outcomes = self.processor.run([tasks[i] for i in piece], name)
            self.counters.count(outcomes, time.perf_counter() - t_piece)
            self.finisher.then(functools.partial(self._record, shard.job_id, outcomes))
        return True

    def _record(self, job_id: str, outcomes: list[Outcome]) -> None:
        """Record a piece's items, after its seal (a deferred seal's unstorable records fail)."""
        take = getattr(self.processor.sink, "take_unstored", None)
        lost = take() if take is not None else None
        if lost:
            outcomes = [lost.fail(o) for o in outcomes]
        done = [o.task.image_id for o in outcomes if not isinstance(o, Failed)]
        failed = {o.task.image_id: o.reason for o in outcomes if isinstance(o, Failed)}
        q.record_items(self.r, job_id, done, failed)

    def _hand_off(self, entry: q.Entry, shard: JobShard, start: int) -> None:
        rest = replace(shard, items=shard.items[start:])
        q.hand_off(self.r, entry, rest)
        n = len(rest.items)
        log.info("job %s shard %d: stopping, handed %d items back", shard.job_id, shard.shard_no, n)


def fail_dead(client: Client, entry: q.Entry, deliveries: int, reason: str) -> None:
    """Fail a dead-lettered entry's online request or job items with ``reason``.

    The janitor's ``on_dead`` callback, bound to the worker's client.
    """
    try:
        if entry.stream == ONLINE_STREAM:
            req = OnlineRequest.from_fields(entry.fields or {})
            q.post_result(client, OnlineResult(req.request_id, "error", reason=reason))
        else:
            shard = JobShard.from_fields(entry.fields or {})
            failed = {item.image_id: reason for item in shard.items}
            q.record_items(client, shard.job_id, [], failed)
    except ProtocolError as exc:
        log.error("dead entry %s is malformed (%s); nobody to tell", entry.entry_id, exc)
