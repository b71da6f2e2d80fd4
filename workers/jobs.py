"""Batch-job bookkeeping in Redis: the job hash, its errors and idempotent counters (torch-free).

Part of the queue protocol described in ``butd.workers.queue`` (which re-exports these functions):
hash ``butd:job:{id}``, hash ``butd:job:{id}:errors``, set ``butd:job:{id}:seen``. State changes
and counting run as Lua scripts, so concurrent workers and redelivered shards never race or count
an item twice.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    JOBS_STREAM,
    JobItem,
    JobShard,
    JobState,
    JobStatus,
    ProtocolError,
    decode_fields,
    decode_options,
    job_errors_key,
    job_key,
    job_seen_key,
    job_state,
    shard_items,
    stream_fields,
    text,
)

if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT, FieldT

    Client = redis.Redis


def create_job(
    r: Client,
    job_id: str,
    items: Sequence[JobItem],
    *,
    options: ExtractOptions | None = None,
    namespace: str = "",
    shard_size: int = 256,
    ttl_s: int = 7 * 24 * 3600,
) -> JobStatus:
    """Create a batch job and queue its shards; a job id that exists is returned unchanged.

    Args:
        job_id: caller-chosen id (an idempotency key: resubmitting creates nothing).
        items: the images; ``image_id`` must be unique within the job.
        options: extraction overrides for every item.
        namespace: id space of the job's image ids.
        shard_size: items per stream entry (one sealed store shard per entry).
        ttl_s: seconds the job's keys live after it finishes.
    """
    options = options or ExtractOptions()
    ids = [i.image_id for i in items]
    if len(set(ids)) != len(ids):
        raise ProtocolError(
            f"image ids must be unique within a job; {len(ids) - len(set(ids))} repeat"
        )
    key = job_key(job_id)
    if not r.hsetnx(key, "job_id", job_id):
        status = job_status(r, job_id)
        if status is not None:
            return status
    pipe = r.pipeline(transaction=True)
    pipe.hset(key, mapping=_job_fields(job_id, len(items), options, namespace, ttl_s))
    for no, chunk in enumerate(shard_items(items, shard_size)):
        shard = JobShard(job_id, no, chunk, options, namespace)
        pipe.xadd(JOBS_STREAM, stream_fields(shard.to_fields()))
    pipe.execute()
    if not items:
        record_items(r, job_id, [], {})
    status = job_status(r, job_id)
    assert status is not None
    return status


def _job_fields(
    job_id: str, total: int, options: ExtractOptions, namespace: str, ttl_s: int
) -> dict[FieldT, EncodableT]:
    return {
        "job_id": job_id,
        "state": "queued",
        "total": total,
        "done": 0,
        "failed": 0,
        "created_at": time.time(),
        "started_at": 0,
        "finished_at": 0,
        "options": options.to_json(),
        "namespace": namespace,
        "ttl_s": ttl_s,
    }


def job_status(
    r: Client, job_id: str, *, max_errors: int = 100, now: float | None = None
) -> JobStatus | None:
    """The job's state, counters, rate (images/s), ETA and first ``max_errors`` errors."""
    f = decode_fields(r.hgetall(job_key(job_id)))
    if "state" not in f:
        return None
    errors: dict[str, str] = {}
    for k, v in r.hscan_iter(job_errors_key(job_id), count=max(max_errors, 10)):
        if len(errors) >= max_errors:
            break
        errors[text(k)] = text(v)
    total, done, failed = int(f["total"]), int(f.get("done", 0)), int(f.get("failed", 0))
    started, finished = float(f.get("started_at", 0)), float(f.get("finished_at", 0))
    end = finished or (time.time() if now is None else now)
    rate = (done + failed) / (end - started) if started and end > started else 0.0
    left = total - done - failed
    eta = left / rate if rate > 0 and not finished else (0.0 if finished else None)
    return JobStatus(
        job_id=job_id,
        state=job_state(f["state"]),
        total=total,
        done=done,
        failed=failed,
        created_at=float(f.get("created_at", 0)),
        started_at=started,
        finished_at=finished,
        images_per_s=rate,
        eta_s=eta,
        errors=dict(sorted(errors.items())),
        namespace=f.get("namespace", ""),
        options=decode_options(f.get("options") or None),
    )


_CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'queued' or state == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1])
  local ttl = tonumber(redis.call('HGET', KEYS[1], 'ttl_s') or '0')
  if ttl and ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
  return 'cancelled'
end
return state
"""


def cancel_job(r: Client, job_id: str) -> JobState | None:
    """Cancel a queued or running job; workers ack and skip its remaining shards.

    Returns:
        The job's state afterwards ("cancelled", or the terminal state it already had), or None
        when there is no such job.
    """
    state = r.eval(_CANCEL, 1, job_key(job_id), str(time.time()))
    return None if state is None else job_state(state)


_START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return false end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[1])
  state = 'running'
end
return state
"""


def mark_job_started(r: Client, job_id: str) -> JobState | None:
    """Move a queued job to running (first shard taken); returns its state, None if unknown."""
    state = r.eval(_START, 1, job_key(job_id), str(time.time()))
    return None if state is None else job_state(state)


_RECORD = """
local job, seen, errs = KEYS[1], KEYS[2], KEYS[3]
if redis.call('EXISTS', job) == 0 then return false end
local nd = tonumber(ARGV[2])
local new_done, new_failed = 0, 0
for i = 3, 2 + nd do
  if redis.call('SADD', seen, ARGV[i]) == 1 then new_done = new_done + 1 end
end
for i = 3 + nd, #ARGV, 2 do
  if redis.call('SADD', seen, ARGV[i]) == 1 then
    new_failed = new_failed + 1
    redis.call('HSET', errs, ARGV[i], ARGV[i + 1])
  end
end
local done = redis.call('HINCRBY', job, 'done', new_done)
local failed = redis.call('HINCRBY', job, 'failed', new_failed)
local total = tonumber(redis.call('HGET', job, 'total'))
local state = redis.call('HGET', job, 'state')
if done + failed >= total and (state == 'queued' or state == 'running') then
  if done == 0 and total > 0 then state = 'failed' else state = 'done' end
  redis.call('HSET', job, 'state', state, 'finished_at', ARGV[1])
  local ttl = tonumber(redis.call('HGET', job, 'ttl_s') or '0')
  if ttl and ttl > 0 then
    for _, k in ipairs(KEYS) do redis.call('EXPIRE', k, ttl) end
  end
end
return {new_done, new_failed, state}
"""


def record_items(
    r: Client, job_id: str, done_ids: Sequence[str], failed: Mapping[str, str]
) -> tuple[int, int, JobState] | None:
    """Count finished items of a job, each image id once however often it is reported.

    Args:
        done_ids: image ids stored (or found already stored).
        failed: image id -> reason of the items that failed.

    Returns:
        (newly counted done, newly counted failed, job state afterwards); None if no such job.
    """
    args: list[str] = [str(time.time()), str(len(done_ids)), *done_ids]
    for image_id, reason in failed.items():
        args += [image_id, reason]
    keys = (job_key(job_id), job_seen_key(job_id), job_errors_key(job_id))
    reply = r.eval(_RECORD, 3, *keys, *args)
    if reply is None:
        return None
    return int(reply[0]), int(reply[1]), job_state(reply[2])
