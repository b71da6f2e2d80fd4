"""The request-queue primitives both queues share: the online extraction queue
(``butd.workers.queue``) and the heads queue (``butd.workers.heads_protocol``). Torch-free.

A request queue is a stream read by the consumer group ``workers`` plus one reply list per
request. On it:

* ``ensure_group``: create the group (and the stream) if missing.
* ``stream_depth``: requests waiting or in progress, the one definition of queue depth: the
  group's lag (entries not yet delivered; XLEN when Redis does not know it) + its pending
  entries (delivered, not acked); XLEN when the group does not exist yet (nothing delivered).
* ``enqueue_if_room``: admission and XADD in one Lua script, so concurrent gateways never admit
  past the limit (a depth read followed by an XADD would: both read the same depth).
* ``push_reply`` / ``wait_reply``: the worker LPUSHes one reply with an EXPIRE, the gateway
  BLPOPs it in calls of at most ``MAX_BLOCK_S``; each queue decodes its own reply type.

Key names, field maps and reply encodings belong to the callers; nothing here names a stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import redis

from butd.workers.protocol import GROUP

if TYPE_CHECKING:
    from redis.typing import EncodableT

    Client = redis.Redis

__all__ = [
    "MAX_BLOCK_S",
    "Blob",
    "enqueue_if_room",
    "ensure_group",
    "push_reply",
    "stream_depth",
    "wait_reply",
]

T = TypeVar("T")

# Longest single blocking call (BLPOP, XREADGROUP BLOCK), seconds; below the clients' read
# timeouts (``butd.workers.queue.connect``: 30 s), so a dead Redis host is noticed.
MAX_BLOCK_S = 10.0

# depth(stream, group): the definition ``stream_depth`` documents, shared by both scripts.
_DEPTH_FN = """
local function depth(stream, group)
  local ok, groups = pcall(redis.call, 'XINFO', 'GROUPS', stream)
  if not ok then return 0 end
  for _, g in ipairs(groups) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f['name'] == group then
      local lag = f['lag']
      if not lag then lag = redis.call('XLEN', stream) end
      return lag + f['pending']
    end
  end
  return redis.call('XLEN', stream)
end
"""

# KEYS: stream. ARGV: group.
_DEPTH = _DEPTH_FN + "return depth(KEYS[1], ARGV[1])\n"

# KEYS: stream [, blob key]. ARGV: group, max depth, MAXLEN cap (0 = none), blob TTL s, blob,
# then the entry's field/value pairs. Returns {1 = queued | 0 = refused, depth before}.
_ENQUEUE_IF_ROOM = (
    _DEPTH_FN
    + """
local d = depth(KEYS[1], ARGV[1])
if d >= tonumber(ARGV[2]) then return {0, d} end
if #KEYS > 1 then redis.call('SET', KEYS[2], ARGV[5], 'EX', ARGV[4]) end
local cmd = {KEYS[1]}
if tonumber(ARGV[3]) > 0 then cmd = {KEYS[1], 'MAXLEN', '~', ARGV[3]} end
cmd[#cmd + 1] = '*'
for i = 6, #ARGV do cmd[#cmd + 1] = ARGV[i] end
redis.call('XADD', unpack(cmd))
return {1, d}
"""
)


@dataclass(frozen=True)
class Blob:
    """Bytes stored beside an admitted entry (its image), under ``key`` for ``ttl_s`` seconds."""

    key: str
    data: bytes
    ttl_s: int


def ensure_group(r: Client, stream: str) -> None:
    """Create the ``workers`` group on ``stream`` (MKSTREAM) unless it exists."""
    try:
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def stream_depth(r: Client, stream: str) -> int:
    """Requests waiting or in progress on ``stream``: the group's lag + pending (one round
    trip; the same number ``enqueue_if_room`` compares with its limit)."""
    script = r.register_script(_DEPTH)  # EVALSHA, loaded once per server
    return int(script(keys=[stream], args=[GROUP]))


def enqueue_if_room(
    r: Client,
    stream: str,
    fields: Mapping[str, str],
    *,
    max_depth: int,
    maxlen: int = 0,
    blob: Blob | None = None,
) -> int | None:
    """XADD ``fields`` to ``stream`` unless ``max_depth`` requests are waiting or in progress,
    atomically (one Lua script: the depth cannot change between the check and the add).

    Args:
        max_depth: refuse at this ``stream_depth``.
        maxlen: cap the stream at about this many entries (XADD MAXLEN ~); 0 = no cap.
        blob: bytes to SET (with EX) beside the entry; stored only when the entry is admitted.

    Returns:
        None when queued, else the depth that refused it.
    """
    keys = [stream] if blob is None else [stream, blob.key]
    args: list[EncodableT] = [
        GROUP,
        max_depth,
        maxlen,
        0 if blob is None else blob.ttl_s,
        b"" if blob is None else blob.data,
        *(x for pair in fields.items() for x in pair),
    ]
    script = r.register_script(_ENQUEUE_IF_ROOM)  # EVALSHA, loaded once per server
    queued, depth = script(keys=keys, args=args)
    return None if int(queued) else int(depth)


def push_reply(r: Client, key: str, payload: EncodableT, *, ttl_s: int) -> None:
    """LPUSH one reply onto ``key`` and EXPIRE the list after ``ttl_s``, in one MULTI."""
    pipe = r.pipeline(transaction=True)
    pipe.lpush(key, payload)
    pipe.expire(key, ttl_s)
    pipe.execute()


def wait_reply(r: Client, key: str, timeout_s: float, decode: Callable[[Any], T]) -> T | None:
    """Block until a reply is pushed onto ``key``; ``decode(reply)``, or None after
    ``timeout_s`` seconds. BLPOPs at most ``MAX_BLOCK_S`` at a time.

    Args:
        decode: the reply type's decoder (takes the raw value, bytes or str).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        reply = r.blpop([key], timeout=min(max(left, 0.01), MAX_BLOCK_S))
        if reply is not None:
            return decode(reply[1])
        if left <= MAX_BLOCK_S:
            return None
