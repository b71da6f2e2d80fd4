"""The real ``Queue`` over ``butd.workers.queue`` (Redis Streams) for the gateway.

Two redis-py clients (thread-safe connection pools) are shared across request threads: one for
quick commands, with a short read timeout so a hung Redis surfaces as a 503 within seconds, and
one for ``wait_result``'s BLPOP, whose read timeout covers the longest wait (redis-py 8 defaults
``socket_timeout`` to 5 s, which would cut a longer BLPOP short). The blocking pool is sized
for ``max_queue_depth`` concurrent waits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import redis

from butd.service.backend import RequestClaim
from butd.workers import heads_protocol as hq
from butd.workers import queue as q
from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    ONLINE_STREAM,
    Heartbeat,
    JobItem,
    JobStatus,
    OnlineRequest,
    OnlineResult,
    model_key,
    text,
)
from butd.workers.streams import ensure_group
from butd.workers.wire import ModelMeta

if TYPE_CHECKING:
    Client = redis.Redis

# How long an Idempotency-Key stays bound to its first request once answered, seconds (as long
# as a finished job's keys live: ``butd.workers.jobs.create_job``'s ttl_s) ...
CLAIM_TTL_S = 7 * 24 * 3600
# ... and while that request is still being processed (a gateway that dies mid-request frees
# the key after this long; unpacking the largest archive takes minutes), seconds.
CLAIM_PENDING_TTL_S = 3600


def request_claim_key(job_id: str) -> str:
    """Hash ``fingerprint``, ``answer`` of the request that took the job id ``job_id``."""
    return f"butd:job:{job_id}:request"


def connect(url: str, *, max_connections: int, socket_timeout: float = 5.0) -> Client:
    """A bytes-reply client on a bounded pool; a command waits ``socket_timeout`` s at most.

    Args:
        max_connections: pool size; a thread waits up to 10 s for a free connection.
        socket_timeout: read timeout of one command, seconds.
    """
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=10,
        socket_connect_timeout=5,
        socket_timeout=socket_timeout,
        health_check_interval=30,
    )
    return redis.Redis(connection_pool=pool)


class RedisQueue:
    """``butd.service.backend.Queue`` on a Redis server.

    Args:
        client: a bytes-reply redis-py client for quick commands.
        blocking: the client ``wait_result`` blocks on (read timeout above the longest wait).
        heartbeat_max_age_s: a heartbeat older than this does not count as live.
        job_shard_size: images per stream entry of a batch job.
        image_ttl_s: lifetime of uploaded bytes waiting in Redis (covers the request timeout).
    """

    def __init__(
        self,
        client: Client,
        blocking: Client,
        *,
        heartbeat_max_age_s: float,
        job_shard_size: int,
        image_ttl_s: int,
    ) -> None:
        self.client = client
        self.blocking = blocking
        self._max_age = heartbeat_max_age_s
        self._shard_size = job_shard_size
        self._image_ttl = image_ttl_s
        q.ensure_groups(client)
        ensure_group(client, hq.HEADS_STREAM)

    def ping(self) -> bool:
        return bool(self.client.ping())

    def live_workers(self) -> list[Heartbeat]:
        now = time.time()
        beats = q.live_workers(self.client)
        return [b for b in beats if now - b.updated_at <= self._max_age]

    def queue_depth(self) -> int:
        """Online requests waiting or in progress (``butd.workers.streams.stream_depth``: the
        number admission compares with its limit), in one round trip."""
        return q.stream_depth(self.client, ONLINE_STREAM)

    def pending_count(self) -> int:
        return sum(q.pending_count(self.client).values())

    def enqueue_online(self, request: OnlineRequest, data: bytes, *, max_depth: int) -> int | None:
        return q.enqueue_online_if_room(
            self.client, request, data, max_depth=max_depth, image_ttl_s=self._image_ttl
        )

    def wait_result(self, request_id: str, timeout_s: float) -> OnlineResult | None:
        return q.wait_result(self.blocking, request_id, timeout_s)

    def enqueue_heads(self, request: hq.HeadsRequest, *, max_depth: int) -> int | None:
        return hq.enqueue_heads(self.client, request, max_depth=max_depth)

    def wait_heads(self, request_id: str, timeout_s: float) -> hq.HeadsResult | None:
        return hq.wait_heads_result(self.blocking, request_id, timeout_s)

    def model_meta(self, model_version: str) -> ModelMeta | None:
        data = self.client.get(model_key(model_version))
        return None if data is None else ModelMeta.from_json(data)

    def create_job(
        self, job_id: str, items: Sequence[JobItem], *, namespace: str, options: ExtractOptions
    ) -> JobStatus:
        return q.create_job(
            self.client,
            job_id,
            items,
            options=options,
            namespace=namespace,
            shard_size=self._shard_size,
        )

    def job_status(self, job_id: str) -> JobStatus | None:
        return q.job_status(self.client, job_id)

    def cancel_job(self, job_id: str) -> str | None:
        return q.cancel_job(self.client, job_id)

    def claim_request(self, job_id: str, fingerprint: str) -> RequestClaim | None:
        key = request_claim_key(job_id)
        pipe = self.client.pipeline(transaction=True)
        pipe.hsetnx(key, "fingerprint", fingerprint)
        pipe.expire(key, CLAIM_PENDING_TTL_S, nx=True)
        pipe.hgetall(key)
        taken, _, fields = pipe.execute()
        if taken:
            return None
        found = {text(k): text(v) for k, v in fields.items()}
        return RequestClaim(found.get("fingerprint", ""), found.get("answer"))

    def save_answer(self, job_id: str, answer: str) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(request_claim_key(job_id), "answer", answer)
        pipe.expire(request_claim_key(job_id), CLAIM_TTL_S)
        pipe.execute()

    def release_request(self, job_id: str) -> None:
        self.client.delete(request_claim_key(job_id))

    def close(self) -> None:
        """Close both clients' connections."""
        self.client.close()
        self.blocking.close()
