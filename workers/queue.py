"""The Redis Streams queue between the gateway and the workers (torch-free).

Protocol (message types in ``butd.workers.protocol``):

Streams, one consumer group ``workers`` on each (created by ``ensure_groups``):

* ``butd:online``: one entry = one image to extract now (``OnlineRequest.to_fields``):
  ``request_id``, ``content_sha256``, ``namespace``, ``image_id``, ``options`` (JSON of
  ``butd.workers.options.ExtractOptions``: min_boxes / max_boxes / conf_thresh / grid_size,
  absent = worker default), ``deadline_ms`` (epoch ms, 0 =
  none), and the image as ``image_key`` (a Redis string holding the uploaded bytes, with a TTL)
  or ``path`` (a file on storage the workers share). A worker that reaches an entry after its
  deadline acks it without computing and reports ``expired``.
* ``butd:jobs``: one entry = one shard of a batch job (``JobShard.to_fields``): ``job_id``,
  ``shard_no``, ``items`` (JSON list of ``{"ref", "image_id"}``; ``ref`` is an absolute path or
  ``ARCHIVE::MEMBER``), ``options``, ``namespace``.
* ``butd:dlq``: dead letters: the original fields plus ``stream``, ``entry_id``, ``deliveries``,
  ``reason``. An entry lands here after ``MAX_DELIVERIES`` deliveries without an ack.

Delivery is at-least-once. A worker reads its own pending entries first (id ``0``) after a
restart, then new ones (``>``); it acks an entry only after its features are sealed in the store
and indexed (an online entry is answered first, then sealed, then acked: a crash in between
leaves it pending, so it is recomputed and sealed; caching is at-least-once). The janitor in
every worker XAUTOCLAIMs entries idle longer than ``CLAIM_IDLE_MS`` (more than the worst batch
time) and dead-letters those delivered more than ``MAX_DELIVERIES`` times (XADD to the DLQ and
XACK in one MULTI). Only acknowledged entries are trimmed (``trim_acked``: XTRIM MINID below the
oldest pending and the first undelivered id; never MAXLEN, which deletes pending entries on
Redis < 8.2). All writes are idempotent, so a redelivered entry is harmless.

Online results: the worker LPUSHes one ``OnlineResult`` (status ``ok`` | ``error`` |
``expired``, ``model_version``, ``content_sha256``, ``reason``, ``num_boxes``, ``cached``,
``timings``) onto ``butd:result:{request_id}`` with an EXPIRE; the gateway BLPOPs it
(``wait_result``). A freshly computed record travels with the result (``butd.workers.wire``: JSON
header + raw arrays) and is pushed *before* the worker seals it, then the entry is acked; a
result without a record (``cached``) is read from the store's index by (model_version,
content_sha256). ``butd:model:{version}`` holds the vocabularies the gateway renders with.

Jobs: hash ``butd:job:{id}`` (``job_id``, ``state`` queued | running | done | failed |
cancelled, ``total``, ``done``, ``failed``, ``created_at``, ``started_at``, ``finished_at``,
``options``, ``namespace``, ``ttl_s``), hash ``butd:job:{id}:errors`` (image_id -> reason) and set
``butd:job:{id}:seen`` (image ids already counted). A worker marks a job running when it takes a
shard, skips (acks) the shards of a cancelled job, and counts items with ``record_items`` after
the shard is sealed: a Lua script SADDs each id to the seen set and bumps ``done`` / ``failed``
only when the id is new, so a redelivered shard never counts twice. The job ends ``done`` when
done + failed == total (``failed`` when nothing succeeded); keys then expire after ``ttl_s``.

Heartbeats: ``butd:worker:{id}`` holds a JSON ``Heartbeat`` with a TTL of a few refresh periods;
``live_workers`` lists them.

Admission, depth, reply lists and ``MAX_BLOCK_S`` are the primitives of
``butd.workers.streams``, shared with the heads queue (``butd.workers.heads_protocol``): an
online request is admitted while ``stream_depth`` (the group's lag + pending) is below the
limit, checked and added in one Lua script.

Use a client from ``connect`` (bytes replies); str-decoding clients work for every function here
except reading image bytes, which only the worker does.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import redis

from butd.workers.jobs import (
    cancel_job,
    create_job,
    job_status,
    mark_job_started,
    record_items,
)
from butd.workers.protocol import (
    DLQ_STREAM,
    GROUP,
    JOBS_STREAM,
    ONLINE_STREAM,
    STREAMS,
    WORKER_KEY_PATTERN,
    Heartbeat,
    JobShard,
    OnlineRequest,
    OnlineResult,
    ProtocolError,
    decode_fields,
    image_key,
    result_key,
    stream_fields,
    text,
    worker_key,
)
from butd.workers.streams import (
    MAX_BLOCK_S,
    Blob,
    enqueue_if_room,
    ensure_group,
    push_reply,
    stream_depth,
    wait_reply,
)
from butd.workers.wire import decode_result, encode_result

if TYPE_CHECKING:
    Client = redis.Redis

__all__ = [
    "DLQ_STREAM",
    "GROUP",
    "JOBS_STREAM",
    "MAX_BLOCK_S",
    "ONLINE_STREAM",
    "Entry",
    "ack",
    "cancel_job",
    "connect",
    "create_job",
    "dead_letter",
    "dlq_length",
    "enqueue_online",
    "enqueue_online_if_room",
    "ensure_groups",
    "hand_off",
    "job_status",
    "live_workers",
    "mark_job_started",
    "pending_count",
    "post_result",
    "read_entries",
    "record_items",
    "stream_depth",
    "touch",
    "trim_acked",
    "wait_result",
    "write_heartbeat",
]


@dataclass(frozen=True)
class Entry:
    """One stream entry as a consumer sees it.

    Attributes:
        stream: the stream it came from.
        entry_id: its stream id ("1700000000000-0").
        fields: its field map, or None when the entry was deleted (trimmed) while pending.
    """

    stream: str
    entry_id: str
    fields: dict[str, str] | None


def connect(url: str, *, socket_timeout: float = 30.0, connect_timeout: float = 5.0) -> Client:
    """A client with bytes replies and a read timeout above ``MAX_BLOCK_S`` (a dead host is
    noticed; blocking calls here never block longer than ``MAX_BLOCK_S`` at once)."""
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )


def ensure_groups(r: Client) -> None:
    """Create the consumer group on both streams (and the streams), if missing."""
    for stream in STREAMS:
        ensure_group(r, stream)


# --- gateway side -------------------------------------------------------------------------


def enqueue_online(
    r: Client, request: OnlineRequest, data: bytes | None = None, *, image_ttl_s: int = 300
) -> OnlineRequest:
    """Queue one online request; with ``data``, store the bytes under ``image_key`` first.

    Returns:
        The request as queued (``image_key`` filled in when ``data`` was given).
    """
    if data is None and not request.path:
        raise ProtocolError("an online request needs image bytes or a path")
    pipe = r.pipeline(transaction=True)
    if data is not None:
        key = image_key(request.request_id)
        request = OnlineRequest(**{**request.__dict__, "image_key": key})
        pipe.set(key, data, ex=image_ttl_s)
    pipe.xadd(ONLINE_STREAM, stream_fields(request.to_fields()))
    pipe.execute()
    return request


def enqueue_online_if_room(
    r: Client, request: OnlineRequest, data: bytes, *, max_depth: int, image_ttl_s: int = 300
) -> int | None:
    """Queue one online request with its bytes unless ``max_depth`` requests are waiting or
    in progress (``stream_depth``), atomically (``butd.workers.streams.enqueue_if_room``): the
    bytes are stored under ``image_key`` only when the request is admitted.

    Returns:
        None when queued, else the depth that refused it.
    """
    key = image_key(request.request_id)
    fields = OnlineRequest(**{**request.__dict__, "image_key": key}).to_fields()
    blob = Blob(key, data, image_ttl_s)
    return enqueue_if_room(r, ONLINE_STREAM, fields, max_depth=max_depth, blob=blob)


def wait_result(r: Client, request_id: str, timeout_s: float) -> OnlineResult | None:
    """Block until the worker reports on ``request_id``; None after ``timeout_s`` seconds."""
    return wait_reply(r, result_key(request_id), timeout_s, decode_result)


def pending_count(r: Client) -> dict[str, int]:
    """Entries delivered but not yet acknowledged, per stream."""
    counts: dict[str, int] = {}
    for stream in STREAMS:
        try:
            counts[stream] = int(r.xpending(stream, GROUP)["pending"])
        except redis.ResponseError:
            counts[stream] = 0
    return counts


def dlq_length(r: Client) -> int:
    """Number of dead letters."""
    return int(r.xlen(DLQ_STREAM))


def live_workers(r: Client) -> list[Heartbeat]:
    """Heartbeats of the workers whose heartbeat key has not expired, by worker id."""
    keys = sorted(r.scan_iter(match=WORKER_KEY_PATTERN, count=100))
    if not keys:
        return []
    beats = [Heartbeat.from_json(v) for v in r.mget(keys) if v is not None]
    return sorted(beats, key=lambda b: b.worker_id)


# --- worker side --------------------------------------------------------------------------


def read_entries(
    r: Client,
    streams: Sequence[str],
    consumer: str,
    *,
    count: int,
    block_ms: int | None = None,
    pending: bool = False,
) -> list[Entry]:
    """XREADGROUP up to ``count`` entries per stream.

    Args:
        pending: read this consumer's own pending entries (id 0) instead of new ones (``>``).
        block_ms: wait up to this long for new entries; None = return at once.
    """
    if block_ms is not None and not 1 <= block_ms <= MAX_BLOCK_S * 1000:
        raise ValueError(f"block_ms must be in [1, {MAX_BLOCK_S * 1000:.0f}]; got {block_ms}")
    start = "0" if pending else ">"
    reply = r.xreadgroup(
        GROUP, consumer, dict.fromkeys(streams, start), count=count, block=block_ms
    )
    # RESP2 (``connect`` keeps the default protocol): a list of [stream, [(id, fields), ...]]
    # pairs, redis-py's ``list[list[Any]]`` member; its dict members are RESP3 shapes.
    pairs = cast("list[list[Any]]", reply or [])
    out: list[Entry] = []
    for stream, entries in pairs:
        for entry_id, fields in entries:
            out.append(
                Entry(
                    text(stream), text(entry_id), None if fields is None else decode_fields(fields)
                )
            )
    return out


def ack(r: Client, stream: str, entry_ids: Iterable[str]) -> int:
    """XACK; returns how many were pending."""
    ids = list(entry_ids)
    return int(r.xack(stream, GROUP, *ids)) if ids else 0


def post_result(r: Client, result: OnlineResult, *, ttl_s: int = 600) -> None:
    """Report on an online request: LPUSH the result (``encode_result``), EXPIRE the list."""
    push_reply(r, result_key(result.request_id), encode_result(result), ttl_s=ttl_s)


def dead_letter(r: Client, entry: Entry, deliveries: int, reason: str) -> None:
    """Copy an entry to the DLQ with why, and ack it, in one MULTI (never lost, never twice)."""
    fields = dict(entry.fields or {})
    fields.update(
        stream=entry.stream, entry_id=entry.entry_id, deliveries=str(deliveries), reason=reason
    )
    pipe = r.pipeline(transaction=True)
    pipe.xadd(DLQ_STREAM, stream_fields(fields))
    pipe.xack(entry.stream, GROUP, entry.entry_id)
    pipe.execute()


def write_heartbeat(r: Client, beat: Heartbeat, *, ttl_s: int) -> None:
    """SET the worker's heartbeat key with a TTL."""
    r.set(worker_key(beat.worker_id), beat.to_json(), ex=ttl_s)


def trim_acked(r: Client, stream: str, *, keep_ms: int = 0) -> int:
    """Delete entries every consumer has acknowledged (and older than ``keep_ms``).

    The threshold is the lowest of: the oldest pending id, the first id the group has not yet
    delivered, and now - ``keep_ms``. XTRIM MINID removes only ids below it.

    Returns:
        The number of entries deleted.
    """
    try:
        info = r.xinfo_groups(stream)
    except redis.ResponseError:
        return 0
    group = next((g for g in info if text(g["name"]) == GROUP), None)
    if group is None:
        return 0
    ms, seq = (int(x) for x in text(group["last-delivered-id"]).split("-"))
    bounds = [(ms, seq + 1)]
    pend = r.xpending(stream, GROUP)
    if int(pend["pending"]) > 0:
        pms, pseq = (int(x) for x in text(pend["min"]).split("-"))
        bounds.append((pms, pseq))
    if keep_ms > 0:
        bounds.append((int(time.time() * 1000) - keep_ms, 0))
    low_ms, low_seq = min(bounds)
    return int(r.xtrim(stream, minid=f"{low_ms}-{low_seq}", approximate=False))


def touch(r: Client, entry: Entry, consumer: str) -> None:
    """Reset an entry's idle time without counting a delivery (a long shard's keep-alive)."""
    r.xclaim(entry.stream, GROUP, consumer, 0, [entry.entry_id], justid=True)


def hand_off(r: Client, entry: Entry, remainder: JobShard) -> None:
    """Queue a shard's unprocessed items as a new entry and ack the old one, in one MULTI."""
    pipe = r.pipeline(transaction=True)
    pipe.xadd(JOBS_STREAM, stream_fields(remainder.to_fields()))
    pipe.xack(entry.stream, GROUP, entry.entry_id)
    pipe.execute()
