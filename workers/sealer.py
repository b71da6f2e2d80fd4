"""Sealing answered online batches on a thread of their own, then acking them (group commit).

The online path answers first (``butd.workers.replies``); what is left, sealing the new records
into a shard, indexing it and acking the entries, costs more than the tiny model's extraction
(an HDF5 shard takes ~20 ms to write on a busy CPU). ``Sealer`` does it beside the main loop:
the loop hands over each batch (``submit``) and goes on reading; the sealer thread lets the
oldest batch wait up to ``linger_s`` for others, takes every batch waiting, seals their records
as one shard per (model version, config), then acks them all through ``finish`` in one MULTI.
One shard holds many batches: the cost of a seal is shared, and the seals take less of the CPU
(and of the GIL) the main loop computes with.

Durability is unchanged: an entry is acked only after its records are sealed and indexed. A
record the store can never hold (a NUL in its id) is sealed apart and dropped, so it never
takes the good records sharing its shard with it (``butd.workers.isolate``). A seal that fails
otherwise leaves its entries pending (they are reclaimed, recomputed and sealed); a
crash loses only unacked work, which is redelivered. While a record waits to be sealed,
``has`` says it is stored, so the same bytes arriving meanwhile are not computed twice (their
answer says ``cached``; the gateway then reads the record once it is sealed).

``Sealer`` is the ``FeatureSink`` of the online ``Processor``: its ``put`` only queues the
batch's rows for the next ``submit``, on the main thread; the sealer thread stores them
through the store's ``put`` (``butd.store.shard_store.StoreWriter``), then acks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from butd.store.records import StoredRow
from butd.store.shards import Alias
from butd.workers.batcher import FeatureSink, stored
from butd.workers.isolate import put_isolated

log = logging.getLogger(__name__)


class PendingSeals:
    """Records handed to a seal that has not run yet, counted per (model_version, sha256).

    A sink that defers its seals (the online ``Sealer``, the pipeline's ``DeferredSink``) answers
    ``has`` for them too, so the same bytes met again meanwhile are not computed twice.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def add(self, keys: Iterable[tuple[str, str]]) -> None:
        """Count ``keys`` as waiting for their seal."""
        with self._lock:
            for key in keys:
                self._counts[key] = self._counts.get(key, 0) + 1

    def release(self, keys: Iterable[tuple[str, str]]) -> None:
        """Their seal ran (stored or failed): ``keys`` no longer wait."""
        with self._lock:
            for key in keys:
                self._counts[key] -= 1
                if self._counts[key] <= 0:
                    del self._counts[key]

    def has(self, sink: FeatureSink, model_version: str, sha256: str) -> bool:
        """Waiting here, or stored in ``sink``."""
        with self._lock:
            if (model_version, sha256) in self._counts:
                return True
        return sink.has(model_version, sha256)

    def has_many(self, sink: FeatureSink, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        """``has`` of each content: ``sink`` asked once for those not waiting here."""
        with self._lock:
            waiting = [(model_version, s) in self._counts for s in sha256s]
        rest = [s for s, w in zip(sha256s, waiting, strict=True) if not w]
        known = iter(stored(sink, model_version, rest))
        return [w or next(known) for w in waiting]


@dataclass(frozen=True)
class PutCall:
    """One ``FeatureSink.put`` call queued for the sealer thread."""

    name: str
    rows: tuple[StoredRow, ...]
    model_version: str
    config: dict[str, Any]
    aliases: tuple[Alias, ...]


@dataclass(frozen=True)
class _Job:
    calls: tuple[PutCall, ...]
    finished: tuple[Any, ...]


class Sealer:
    """Seals and acks submitted online batches on a background thread.

    Args:
        sink: the sink that stores at once (the store's ``StoreWriter``); its ``put`` is called
            from the sealer thread, its ``has`` from the main thread.
        finish: acks a sequence of finished items (``Replies.finish``) after their seal.
        linger_s: how long the oldest waiting batch may wait for others to share its shard,
            seconds (0: seal as soon as the thread is free). A shard costs ~20 ms of CPU, most
            of it holding the GIL the main loop needs; lingering makes it one per interval.
        max_jobs: batches waiting at most; ``submit`` blocks beyond (backpressure) and a
            full house is sealed without lingering.
    """

    def __init__(
        self,
        sink: FeatureSink,
        finish: Callable[[Sequence[Any]], None],
        *,
        linger_s: float = 0.0,
        max_jobs: int = 256,
    ) -> None:
        self.sink = sink
        self._finish = finish
        self._linger_s = linger_s
        self._max_jobs = max_jobs
        self._oldest = 0.0  # monotonic time the oldest waiting batch was submitted
        self._draining = 0
        self._calls: list[PutCall] = []
        self._jobs: list[_Job] = []
        self._pending = PendingSeals()
        self._busy = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="sealer", daemon=True)
        self._thread.start()

    # -- FeatureSink of the online Processor (main thread) -----------------------------------

    def has(self, model_version: str, sha256: str) -> bool:
        """True when the record is stored, or computed and waiting to be sealed here."""
        return self._pending.has(self.sink, model_version, sha256)

    def has_many(self, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        """``has`` of each content: the sink asked once for those not waiting here."""
        return self._pending.has_many(self.sink, model_version, sha256s)

    def put(
        self,
        name: str,
        rows: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        """Queue the rows and aliases for the next ``submit`` (nothing is written yet); they
        are stored before the batch submitted with them is acked."""
        self._calls.append(PutCall(name, tuple(rows), model_version, config, tuple(aliases)))

    # -- main thread -------------------------------------------------------------------------

    def submit(self, finished: Sequence[Any]) -> None:
        """Hand over the batch in hand: the puts queued since the last submit, and what
        ``finish`` acks once they are stored."""
        calls, self._calls = tuple(self._calls), []
        with self._cond:
            while len(self._jobs) >= self._max_jobs and self._thread.is_alive():
                self._cond.wait(0.1)
            if not self._jobs:
                self._oldest = time.monotonic()
            self._jobs.append(_Job(calls, tuple(finished)))
            self._pending.add(_keys(calls))
            self._cond.notify_all()

    def drain(self, timeout_s: float = 60.0) -> bool:
        """Wait until every submitted batch is sealed and acked (or failed); False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._draining += 1  # no lingering while someone waits
            self._cond.notify_all()
            try:
                while self._jobs or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(left)
            finally:
                self._draining -= 1
        return True

    def close(self, timeout_s: float = 60.0) -> None:
        """Seal what was submitted, then stop the thread."""
        self.drain(timeout_s)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # -- sealer thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._ready():
                    self._cond.wait(self._wait_s())
                if not self._jobs:
                    return
                jobs, self._jobs = self._jobs, []
                self._busy = True
                self._cond.notify_all()
            try:
                self._seal(jobs)
            except Exception:  # the entries stay pending: reclaimed, recomputed, sealed
                log.exception("sealing %d online batches failed; entries stay pending", len(jobs))
            finally:
                with self._cond:
                    self._busy = False
                    for job in jobs:
                        self._pending.release(_keys(job.calls))
                    self._cond.notify_all()

    def _ready(self) -> bool:
        """Time to seal (or, with nothing waiting, to stop); called holding the lock."""
        if not self._jobs:
            return self._stopping
        if self._stopping or self._draining or len(self._jobs) >= self._max_jobs:
            return True
        return time.monotonic() - self._oldest >= self._linger_s

    def _wait_s(self) -> float | None:
        """How long to sleep before ``_ready`` can change by itself (None: until notified)."""
        if not self._jobs:
            return None
        return max(self._linger_s - (time.monotonic() - self._oldest), 0.001)

    def _seal(self, jobs: Sequence[_Job]) -> None:
        """One shard per (model version, config) for every waiting batch, then one ack."""
        start = time.perf_counter()
        groups: dict[tuple[str, str], list[PutCall]] = {}
        for job in jobs:
            for call in job.calls:
                groups.setdefault((call.model_version, repr(call.config)), []).append(call)
        for calls in groups.values():
            first = calls[0]
            unique: dict[str, StoredRow] = {}
            for r in (r for c in calls for r in c.rows):
                unique.setdefault(r.content_sha256, r)
            rows = list(unique.values())
            aliases = [a for c in calls for a in c.aliases]
            name = first.name if len(calls) == 1 else f"{first.name}+{len(calls) - 1}"
            put_isolated(self.sink, name, rows, first.model_version, first.config, aliases)
        self._finish([item for job in jobs for item in job.finished])
        log.info(
            "sealed and acked %d online batches (%d shards) in %.1f ms",
            len(jobs),
            len(groups),
            1e3 * (time.perf_counter() - start),
        )


def _keys(calls: Sequence[PutCall]) -> list[tuple[str, str]]:
    return [(c.model_version, r.content_sha256) for c in calls for r in c.rows]
