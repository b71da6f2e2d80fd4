"""A worker that dies or gets stuck loses nothing and stalls nobody; a FIFO fails only itself.

Real worker processes (tiny model, CPU) on a private redis-server. A dead or stuck worker is
played by a *ghost* consumer: the test reads entries into the group under a name, as a worker
would, and writes that name's heartbeat, then stops (dead: the key's TTL runs out) or keeps the
key alive with a loop that stopped moving (stuck). ``CLAIM_IDLE_MS`` is set to ten minutes, so
only the heartbeat signal can explain a take-over within the tests' bounds. Waits are
event-driven with generous bounds; nothing depends on the machine's speed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import redis
from fastapi.testclient import TestClient

from butd.service.app import create_app
from butd.service.settings import Settings
from butd.workers import queue as q
from butd.workers.protocol import (
    DLQ_STREAM,
    JOBS_STREAM,
    ONLINE_STREAM,
    Heartbeat,
    JobItem,
    OnlineRequest,
)
from tests.integration.test_worker_e2e import (  # noqa: F401  (fixtures used by name)
    WorkerProc,
    client,
    image_bytes,
    make_images,
    start_worker,
    tiny_weights,
    wait_for,
)

NEVER_BY_IDLE = {"claim_idle_ms": 600_000}  # the idle-time reclaim cannot fire in a test


def ghost_takes(r: redis.Redis, stream: str, name: str) -> list[q.Entry]:
    """Deliver the waiting entries of ``stream`` to consumer ``name`` (as a worker's read)."""
    entries = q.read_entries(r, [stream], name, count=10)
    assert entries, f"nothing waiting in {stream}"
    return entries


def ghost_beat(r: redis.Redis, name: str, *, ttl_s: int, progress_age_s: float = 0.0) -> None:
    now = time.time()
    beat = Heartbeat(name, "h", 1, "cpu", "v", "ghost", True, updated_at=now,
                     progress_at=now - progress_age_s, stall_after_s=1.0)  # fmt: skip
    q.write_heartbeat(r, beat, ttl_s=ttl_s)


def test_a_fifo_in_a_job_fails_only_its_own_item(
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_url)
    items = make_images(tmp_path / "images", 6)
    fifo = tmp_path / "images" / "pipe.png"
    os.mkfifo(fifo)  # opened plainly, a read would block forever
    items.insert(3, JobItem(str(fifo), "pipe.png"))
    worker = start_worker("w1")
    worker.wait_ready(r)
    q.create_job(r, "fifo", items, shard_size=16)
    wait_for(lambda: q.job_status(r, "fifo").finished, 180, "job done", worker, poll=0.2)
    status = q.job_status(r, "fifo")
    assert status is not None and (status.done, status.failed) == (6, 1)
    assert "FIFO" in status.errors["pipe.png"] and "only regular files" in status.errors["pipe.png"]
    assert q.pending_count(r)[JOBS_STREAM] == 0 and q.dlq_length(r) == 0


def test_a_dead_workers_online_request_is_answered_by_another(
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_url)
    request = OnlineRequest("req-1", "", "", "img-1", deadline_ms=0)
    q.enqueue_online(r, request, image_bytes(7))
    ghost_beat(r, "ghost", ttl_s=1)  # a worker that took the request, then died
    ghost_takes(r, ONLINE_STREAM, "ghost")
    survivor = start_worker("survivor", **NEVER_BY_IDLE)
    survivor.wait_ready(r)
    result = q.wait_result(r, "req-1", timeout_s=180)
    assert result is not None and result.status == "ok", result
    assert "took over 1 entries" in survivor.log() and "from ghost" in survivor.log()
    pending = lambda: q.pending_count(r)[ONLINE_STREAM] == 0  # noqa: E731
    wait_for(pending, 60, "acked after its seal", survivor)


def test_a_stuck_worker_is_reported_and_its_item_failed_not_reclaimed_forever(
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_url)
    items = make_images(tmp_path / "images", 3)
    q.create_job(r, "stuck", items, shard_size=8)
    ghost_beat(r, "ghost", ttl_s=600, progress_age_s=60)  # alive, its loop long silent
    ghost_takes(r, JOBS_STREAM, "ghost")
    settings = Settings(redis_url=redis_url, store_dir=tmp_path / "store", worker_cache_s=0.0)
    with TestClient(create_app(settings)) as gateway:
        ready = gateway.get("/health/ready").json()
        assert ready["ready"] is False and "ghost is stuck" in ready["reason"]
        assert [w["stuck"] for w in ready["workers"]] == [True]

        # MAX_DELIVERIES=1: the ghost's delivery was the one allowed; the take-over is the 2nd
        survivor = start_worker("survivor", max_deliveries=1, **NEVER_BY_IDLE)
        wait_for(lambda: q.job_status(r, "stuck").finished, 180, "job failed", survivor)
        status = q.job_status(r, "stuck")
        assert status is not None and (status.state, status.failed) == ("failed", 3)
        assert all("dead-lettered after" in reason for reason in status.errors.values())
        assert r.xlen(DLQ_STREAM) == 1 and q.pending_count(r)[JOBS_STREAM] == 0
        ghost_beat(r, "ghost", ttl_s=600, progress_age_s=60)  # its heartbeat thread beats on
        ready = gateway.get("/health/ready").json()
        assert ready["ready"] is True
        stuck = {w["worker_id"]: w["stuck"] for w in ready["workers"]}
        assert stuck == {"ghost": True, "survivor": False}
