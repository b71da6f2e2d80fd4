"""Answering online requests: reply with the record first, then ack (``docs/workers.md``).

``Replies.answer`` pushes each computed record to its waiting gateway as soon as the model has
produced it, before the batch is sealed (one pipelined round trip, with the model's
``ModelMeta`` the first time a version is answered). ``Replies.finish`` then, after the seal,
pushes the results not answered yet (expired, failed before the model ran), acks the entries
and deletes the uploaded bytes in one MULTI. A crash between the two leaves the entries
pending: they are redelivered, recomputed and sealed (at-least-once caching).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import redis

from butd.workers import queue as q
from butd.workers.outcomes import Cached, Extracted, Failed, Outcome
from butd.workers.protocol import OnlineResult, model_key, result_key
from butd.workers.wire import ModelMeta, encode_result, stored_form

if TYPE_CHECKING:
    Client = redis.Redis

log = logging.getLogger(__name__)


def _nothing() -> None:
    return None


class Replies:
    """Pushes online results for one worker.

    Args:
        client: the worker's Redis client.
        result_ttl_s: how long a result waits in Redis for the gateway, seconds.
        model_meta: vocabularies and description, SET under ``model_key(version)`` before the
            first answer of each version (None: not published).
        feature_dtype: the store's feature dtype; answered records are cast to it, so the
            answer holds the bytes the store returns later.

    Attributes:
        after_answer: called right after ``answer`` pushed, before the batch is sealed (a
            fault-injection point for tests; does nothing by default).
    """

    def __init__(
        self,
        client: Client,
        *,
        result_ttl_s: int,
        model_meta: ModelMeta | None,
        feature_dtype: str,
    ) -> None:
        self.r = client
        self.ttl_s = result_ttl_s
        self.model_meta = model_meta
        self.feature_dtype = feature_dtype
        self.after_answer: Callable[[], None] = _nothing
        self._published: set[str] = set()

    def answer(self, outcomes: Sequence[Outcome], t_batch: float, quiet: set[str]) -> set[str]:
        """Push each outcome's result (computed records included) now: one round trip.

        Args:
            t_batch: epoch seconds when the batch was formed (goes into ``timings``).
            quiet: entry ids nobody waits for (redelivered past their deadline): skipped.

        Returns:
            The entry ids answered.
        """
        t_extracted = time.time()
        pipe = self.r.pipeline(transaction=False)
        computed = {o.model_version for o in outcomes if isinstance(o, Extracted)}
        versions = computed - self._published
        if self.model_meta is not None:
            for version in versions:
                pipe.set(model_key(version), self.model_meta.to_json())
        answered: set[str] = set()
        for o in outcomes:
            if o.task.entry.entry_id in quiet:
                continue
            timings = {"t_batch": t_batch, "t_extracted": t_extracted, "t_replied": time.time()}
            self._push(pipe, online_result(o, self.feature_dtype, timings))
            answered.add(o.task.entry.entry_id)
        pipe.execute()
        self._published.update(versions)
        log.debug("answered %d of %d before sealing", len(answered), len(outcomes))
        self.after_answer()
        return answered

    def finish(self, finished: Sequence[tuple[q.Entry, OnlineResult | None]]) -> None:
        """Push the results given (None: answered already), XACK every entry and delete its
        uploaded bytes: one MULTI."""
        if not finished:
            return
        pipe = self.r.pipeline(transaction=True)
        for entry, result in finished:
            if result is not None:
                self._push(pipe, result)
            pipe.xack(entry.stream, q.GROUP, entry.entry_id)
            image_key = (entry.fields or {}).get("image_key")
            if image_key:
                pipe.delete(image_key)
        pipe.execute()

    def _push(self, pipe: Any, result: OnlineResult) -> None:
        key = result_key(result.request_id)
        pipe.lpush(key, encode_result(result))
        pipe.expire(key, self.ttl_s)


def online_result(
    o: Outcome, feature_dtype: str = "", timings: dict[str, float] | None = None
) -> OnlineResult:
    """The result of one outcome; with ``feature_dtype``, an extracted record travels with it
    in that dtype (the store's)."""
    request_id = o.task.request_id
    match o:
        case Failed():
            return OnlineResult(
                request_id, "error", content_sha256=o.content_sha256, reason=o.reason
            )
        case Cached():
            return OnlineResult(
                request_id,
                "ok",
                model_version=o.model_version,
                content_sha256=o.content_sha256,
                cached=True,
                timings=timings or {},
            )
        case Extracted():
            record = stored_form(o.record, feature_dtype) if feature_dtype else None
            return OnlineResult(
                request_id,
                "ok",
                model_version=o.model_version,
                content_sha256=o.content_sha256,
                num_boxes=o.record.num_boxes,
                timings=timings or {},
                record=record,
            )
