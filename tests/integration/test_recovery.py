"""Chaos: a worker SIGKILLed mid-batch, Redis restarted mid-job, a worker SIGTERMed mid-shard.

Each test checks the two guarantees of the queue: no job item is lost, and every image is
stored exactly once (rows counted per content hash over every sealed shard file).

The worker fixtures (``start_worker``, ``tiny_weights``) are imported from
``test_worker_e2e``; a test parameter of the same name is the fixture, hence the F811 waivers.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import redis

from butd.store.index import FeatureIndex
from butd.workers import queue as q
from butd.workers.protocol import JOBS_STREAM, JobItem, JobShard
from tests.integration.test_worker_e2e import (  # noqa: F401  (fixtures used by name)
    WorkerProc,
    client,
    file_sha,
    make_images,
    start_worker,
    stored_rows,
    tiny_weights,
    wait_for,
)
from tests.redis_proc import RedisProcess


def assert_each_stored_once(
    r: redis.Redis, store: Path, items: list[JobItem], version: str
) -> None:
    """One row per image over all shard files, and the index points at each of them."""
    rows = stored_rows(store)
    assert set(rows) == {(version, file_sha(it)) for it in items}
    duplicated = {key: n for key, n in rows.items() if n != 1}
    assert duplicated == {}
    index = FeatureIndex(r)
    unindexed = [sha for _, sha in rows if index.lookup_content(version, sha) is None]
    assert unindexed == []


def test_sigkill_mid_batch_is_recovered_by_the_other_worker(
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_url)
    items = make_images(tmp_path / "images", 48)
    victim, survivor = start_worker("victim"), start_worker("survivor", claim_idle_ms=3000)
    victim.wait_ready(r)
    survivor.wait_ready(r)
    q.create_job(r, "kill", items, shard_size=16)

    def victim_mid_shard() -> bool:
        mine = r.xpending_range(JOBS_STREAM, q.GROUP, "-", "+", 10, consumername="victim")
        status = q.job_status(r, "kill")
        return bool(mine) and status is not None and status.done >= 8

    wait_for(victim_mid_shard, 120, "victim holding a shard", victim, survivor, poll=0.1)
    victim.kill()
    wait_for(lambda: q.job_status(r, "kill").finished, 180, "job done", survivor, poll=0.5)

    status = q.job_status(r, "kill")
    assert status is not None and (status.state, status.done, status.failed) == ("done", 48, 0)
    assert "reclaimed" in survivor.log()
    assert_each_stored_once(r, tmp_path / "store", items, q.live_workers(r)[0].model_version)
    assert q.pending_count(r)[JOBS_STREAM] == 0 and q.dlq_length(r) == 0


def test_redis_restart_mid_job_loses_no_item(
    redis_proc: RedisProcess,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_proc.url)
    items = make_images(tmp_path / "images", 40)
    worker = start_worker("w1")
    worker.wait_ready(r)
    q.create_job(r, "restart", items, shard_size=8)
    wait_for(lambda: q.job_status(r, "restart").done >= 8, 120, "first shard", worker, poll=0.1)
    redis_proc.stop()  # SIGTERM: the AOF is flushed; the dir is the fixture's, so it stays
    time.sleep(3)  # long enough for the worker to hit the outage, not just a stale socket
    redis_proc.start()  # same port and dir: the AOF is replayed

    wait_for(lambda: q.job_status(r, "restart").finished, 180, "job done", worker, poll=0.5)
    status = q.job_status(r, "restart")
    assert status is not None and (status.state, status.done, status.failed) == ("done", 40, 0)
    assert "redis unreachable" in worker.log()
    version = q.live_workers(r)[0].model_version
    assert_each_stored_once(r, tmp_path / "store", items, version)
    assert q.pending_count(r)[JOBS_STREAM] == 0 and q.dlq_length(r) == 0


def test_sigterm_finishes_the_batch_in_hand_and_exits_zero(
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., WorkerProc],  # noqa: F811
) -> None:
    r = client(redis_url)
    items = make_images(tmp_path / "images", 32)
    worker = start_worker("w1")
    worker.wait_ready(r)
    version = q.live_workers(r)[0].model_version
    q.create_job(r, "term", items, shard_size=32)  # one shard: 4 pieces of 8
    wait_for(lambda: q.job_status(r, "term").done >= 8, 120, "first piece", worker, poll=0.05)
    worker.signal(signal.SIGTERM)
    assert worker.wait(60) == 0, worker.log()[-3000:]

    status = q.job_status(r, "term")
    assert status is not None and status.done % 8 == 0 and status.failed == 0
    assert q.pending_count(r)[JOBS_STREAM] == 0  # nothing left unacknowledged
    rest = q.read_entries(r, [JOBS_STREAM], "check", count=10)
    left = [i.image_id for e in rest for i in JobShard.from_fields(e.fields or {}).items]
    done_ids = {it.image_id for it in items[: status.done]}
    assert len(left) == 32 - status.done and not done_ids & set(left)  # handed back, not lost
    assert status.done == 32 or "handed" in worker.log()
    assert_each_stored_once(r, tmp_path / "store", items[: status.done], version)
