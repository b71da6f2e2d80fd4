"""Crash recovery for the streams: reclaim idle entries, dead-letter poison ones, trim acked ones.

Runs inside every worker as a periodic step of its main loop (no thread, no lock to expire):

1. Take over the pending entries of *orphaned* consumers at once: a consumer whose heartbeat key
   has expired (the worker died) or whose heartbeat says its loop is stuck (``Heartbeat.stalled``)
   (``XINFO CONSUMERS``, then ``XCLAIM`` of its ``XPENDING`` ids). The heartbeat TTL is the
   signal, so a crashed worker's online requests are redone within seconds, not
   ``claim_idle_ms``. Then ``XAUTOCLAIM`` entries pending longer than ``claim_idle_ms`` under
   any consumer (a worker that lost its heartbeat key some other way). Claiming resets their
   idle time and counts a delivery, so one janitor wins each entry, and an entry that makes
   every worker crash or hang is dead-lettered after ``max_deliveries``.
2. Look up each claimed entry's delivery count (``XPENDING`` extended form). An entry delivered
   more than ``max_deliveries`` times is copied to ``butd:dlq`` and acked in one MULTI, and the
   ``on_dead`` callback fails its online request or job items with the reason. The others are
   handed back to the worker to process.
3. ``XTRIM MINID`` below the oldest pending and the first undelivered entry (``trim_acked``).

``HeartbeatThread`` refreshes the worker's heartbeat key on its own connection, so a long batch
never lets it expire.

The same screening (``screen``) applies to the worker's own pending entries re-read after a
restart, so an entry that crashes the worker on every attempt still reaches the DLQ.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import redis

from butd.workers.protocol import (
    GROUP,
    JOBS_STREAM,
    ONLINE_STREAM,
    Heartbeat,
    decode_fields,
    text,
    worker_key,
)
from butd.workers.queue import Entry, ack, connect, dead_letter, trim_acked, write_heartbeat

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)

DeadFn = Callable[[Entry, int, str], None]


class Janitor:
    """Periodic reclaim / dead-letter / trim step of one worker.

    Args:
        consumer: the worker's consumer name (claimed entries become its own).
        claim_idle_ms: idle time after which a pending entry is presumed lost, ms.
        max_deliveries: deliveries after which an entry is dead-lettered.
        interval_s: seconds between runs (``due``).
        trim_keep_ms: acked entries younger than this are kept, ms.
        claim_counts: most entries claimed per run, per stream (a worker takes only what it can
            process soon; the rest waits for the next run or another worker).
        on_dead: called with (entry, deliveries, reason) after an entry was dead-lettered.
    """

    def __init__(
        self,
        consumer: str,
        *,
        claim_idle_ms: int,
        max_deliveries: int,
        interval_s: float,
        trim_keep_ms: int,
        claim_counts: dict[str, int] | None = None,
        on_dead: DeadFn | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.consumer = consumer
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.interval_s = interval_s
        self.trim_keep_ms = trim_keep_ms
        self.claim_counts = claim_counts or {ONLINE_STREAM: 8, JOBS_STREAM: 1}
        self.on_dead = on_dead
        self.clock = clock
        self._next_run = 0.0
        self.reclaimed = 0
        self.orphans_claimed = 0
        self.dead = 0

    def due(self) -> bool:
        """True when ``interval_s`` has passed since the last run."""
        return self.clock() >= self._next_run

    def run(self, r: Client, streams: Sequence[str] | None = None) -> list[Entry]:
        """One pass over ``streams`` (default: all of ``claim_counts``); returns the reclaimed
        entries the worker should process."""
        self._next_run = self.clock() + self.interval_s
        start = time.perf_counter()
        keep: list[Entry] = []
        trimmed = 0
        for stream, count in self.claim_counts.items():
            if streams is not None and stream not in streams:
                continue
            claimed = self._claim_orphaned(r, stream, count)
            claimed += self._claim(r, stream, count - len(claimed))
            keep += self.screen(r, claimed)
            trimmed += trim_acked(r, stream, keep_ms=self.trim_keep_ms)
        if keep or trimmed:
            log.info(
                "janitor %s: reclaimed %d entries, trimmed %d in %.3fs",
                self.consumer,
                len(keep),
                trimmed,
                time.perf_counter() - start,
            )
        self.reclaimed += len(keep)
        return keep

    def orphaned_consumers(self, r: Client, stream: str) -> list[str]:
        """Other consumers holding entries of ``stream`` whose worker is dead or stuck."""
        try:
            consumers = r.xinfo_consumers(stream, GROUP)
        except redis.ResponseError:  # no stream or group yet
            return []
        holders = [text(c["name"]) for c in consumers if int(c["pending"]) > 0]
        holders = [name for name in holders if name != self.consumer]
        if not holders:
            return []
        beats = r.mget([worker_key(name) for name in holders])
        now = time.time()
        return [
            name
            for name, raw in zip(holders, beats, strict=True)
            if raw is None or Heartbeat.from_json(raw).stalled(now)
        ]

    def _claim_orphaned(self, r: Client, stream: str, count: int) -> list[Entry]:
        """Up to ``count`` pending entries of orphaned consumers, claimed for this one."""
        out: list[Entry] = []
        for name in self.orphaned_consumers(r, stream):
            rows = r.xpending_range(stream, GROUP, "-", "+", count - len(out), consumername=name)
            ids: list[Any] = [text(row["message_id"]) for row in rows]
            if not ids:
                continue
            # RESP2 (``connect``): a list of (id, fields) pairs, as XAUTOCLAIM's second item.
            claimed = cast(
                "list[tuple[bytes, Any]]", r.xclaim(stream, GROUP, self.consumer, 0, ids)
            )
            log.warning(
                "janitor %s: took over %d entries of %s from %s (heartbeat expired or stuck)",
                self.consumer,
                len(claimed),
                stream,
                name,
            )
            for entry_id, fields in claimed:
                out.append(
                    Entry(stream, text(entry_id), None if fields is None else decode_fields(fields))
                )
            if len(out) >= count:
                break
        self.orphans_claimed += len(out)
        return out

    def _claim(self, r: Client, stream: str, count: int) -> list[Entry]:
        if count <= 0:
            return []
        reply = r.xautoclaim(
            stream, GROUP, self.consumer, self.claim_idle_ms, start_id="0-0", count=count
        )
        claimed, deleted = reply[1], reply[2] if len(reply) > 2 else []
        if deleted:
            log.warning("janitor: %d pending entries of %s were trimmed away", len(deleted), stream)
        out = []
        for entry_id, fields in claimed:
            out.append(
                Entry(stream, text(entry_id), None if fields is None else decode_fields(fields))
            )
        return out

    def screen(self, r: Client, entries: Sequence[Entry]) -> list[Entry]:
        """Entries this consumer holds that may still be processed; dead-letters the others.

        An entry whose fields are gone (deleted while pending) is acked and dropped.
        """
        if not entries:
            return []
        counts = self.delivery_counts(r, entries)
        keep = []
        for entry in entries:
            if entry.fields is None:
                ack(r, entry.stream, [entry.entry_id])
                continue
            deliveries = counts.get(entry.entry_id, 1)
            if deliveries > self.max_deliveries:
                self._dead_letter(r, entry, deliveries)
            else:
                keep.append(entry)
        return keep

    def delivery_counts(self, r: Client, entries: Sequence[Entry]) -> dict[str, int]:
        """entry id -> times delivered, for entries pending under this consumer."""
        counts: dict[str, int] = {}
        for stream in {e.stream for e in entries}:
            ids = sorted((e.entry_id for e in entries if e.stream == stream), key=_id_key)
            rows = r.xpending_range(
                stream,
                GROUP,
                min=ids[0],
                max=ids[-1],
                count=len(ids) + 1000,
                consumername=self.consumer,
            )
            for row in rows:
                counts[text(row["message_id"])] = int(row["times_delivered"])
        return counts

    def _dead_letter(self, r: Client, entry: Entry, deliveries: int) -> None:
        reason = (
            f"dead-lettered after {deliveries - 1} deliveries without an ack "
            f"(max_deliveries={self.max_deliveries}): the worker crashed or failed on it"
        )
        if self.on_dead is not None:  # first: failing items is idempotent, a lost DLQ entry not
            self.on_dead(entry, deliveries - 1, reason)
        dead_letter(r, entry, deliveries - 1, reason)
        self.dead += 1
        log.error(
            "janitor: entry %s of %s dead-lettered after %d deliveries",
            entry.entry_id,
            entry.stream,
            deliveries - 1,
        )


class HeartbeatThread(threading.Thread):
    """Refreshes the worker's heartbeat key every ``period_s`` on its own connection."""

    def __init__(self, url: str, beat: Callable[[], Heartbeat], period_s: float, ttl_s: int):
        super().__init__(name="heartbeat", daemon=True)
        self.client = connect(url)
        self.beat = beat
        self.period_s = period_s
        self.ttl_s = ttl_s
        self._stop_event = threading.Event()

    def run(self) -> None:
        while True:
            try:
                write_heartbeat(self.client, self.beat(), ttl_s=self.ttl_s)
            except redis.RedisError as exc:
                log.debug("heartbeat not written: %s", exc)
            if self._stop_event.wait(self.period_s):
                return

    def stop(self, worker_id: str) -> None:
        """Stop beating and delete the key, so the gateway stops counting this worker."""
        self._stop_event.set()
        self.join(timeout=5)
        with contextlib.suppress(redis.RedisError):
            self.client.delete(worker_key(worker_id))


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
