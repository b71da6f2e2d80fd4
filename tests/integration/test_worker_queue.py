"""The queue protocol and the janitor against a real redis-server (no model)."""

from __future__ import annotations

import time

import redis

from butd.workers import queue as q
from butd.workers.janitor import Janitor
from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    DLQ_STREAM,
    JOBS_STREAM,
    ONLINE_STREAM,
    Heartbeat,
    JobItem,
    JobShard,
    OnlineRequest,
)


def client(url: str) -> redis.Redis:
    r = q.connect(url)
    q.ensure_groups(r)
    return r


def items(n: int) -> list[JobItem]:
    return [JobItem(f"/data/{i}.jpg", f"img{i}") for i in range(n)]


def pending_ids(r: redis.Redis, stream: str) -> list[str]:
    return [q.text(p["message_id"]) for p in r.xpending_range(stream, q.GROUP, "-", "+", 100)]


def test_job_counts_each_item_once_however_often_it_is_reported(redis_url: str) -> None:
    r = client(redis_url)
    status = q.create_job(r, "j", items(5), shard_size=2, options=ExtractOptions(max_boxes=36))
    assert (status.state, status.total) == ("queued", 5)
    assert q.stream_depth(r, JOBS_STREAM) == 3
    again = q.create_job(r, "j", items(9), shard_size=2)  # same id: nothing new is queued
    assert again.total == 5 and q.stream_depth(r, JOBS_STREAM) == 3

    assert q.mark_job_started(r, "j") == "running"
    assert q.record_items(r, "j", ["img0", "img1"], {}) == (2, 0, "running")
    assert q.record_items(r, "j", ["img0", "img1"], {}) == (0, 0, "running")  # redelivery
    assert q.record_items(r, "j", ["img2"], {"img3": "NotAnImageError: x"}) == (1, 1, "running")
    assert q.record_items(r, "j", ["img3", "img4"], {}) == (1, 0, "done")  # img3 stays failed
    status = q.job_status(r, "j")
    assert status is not None
    assert (status.state, status.done, status.failed) == ("done", 4, 1)
    assert status.errors == {"img3": "NotAnImageError: x"}
    assert status.eta_s == 0.0 and status.images_per_s > 0
    assert 0 < r.ttl("butd:job:j:seen") <= 7 * 24 * 3600
    assert q.cancel_job(r, "j") == "done"  # finished jobs stay finished
    assert q.cancel_job(r, "missing") is None


def test_a_job_where_nothing_succeeds_ends_failed_and_cancel_is_final(redis_url: str) -> None:
    r = client(redis_url)
    q.create_job(r, "bad", items(2))
    assert q.record_items(r, "bad", [], {"img0": "x", "img1": "y"}) == (0, 2, "failed")
    q.create_job(r, "c", items(3))
    assert q.cancel_job(r, "c") == "cancelled"
    assert q.mark_job_started(r, "c") == "cancelled"
    assert q.record_items(r, "c", ["img0", "img1", "img2"], {})[2] == "cancelled"


def test_online_round_trip_and_result_expiry(redis_url: str) -> None:
    r = client(redis_url)
    req = q.enqueue_online(r, OnlineRequest("r1", "s" * 64, "ns", "a"), b"bytes", image_ttl_s=60)
    assert r.get(req.image_key) == b"bytes" and 0 < r.ttl(req.image_key) <= 60
    got = q.read_entries(r, [ONLINE_STREAM, JOBS_STREAM], "w", count=8, block_ms=100)
    assert [OnlineRequest.from_fields(e.fields or {}) for e in got] == [req]
    t0 = time.monotonic()
    assert q.wait_result(r, "r1", 0.2) is None
    assert time.monotonic() - t0 >= 0.15
    q.post_result(r, q.OnlineResult("r1", "ok", "mv", "s" * 64, num_boxes=7), ttl_s=30)
    res = q.wait_result(r, "r1", 1.0)
    assert res is not None and (res.status, res.num_boxes) == ("ok", 7)


def _beat(r: redis.Redis, name: str, progress_age_s: float = 0.0) -> None:
    now = time.time()
    beat = Heartbeat(name, "h", 1, "cpu", "v", "m", True, updated_at=now,
                     progress_at=now - progress_age_s, stall_after_s=30.0)  # fmt: skip
    q.write_heartbeat(r, beat, ttl_s=600)


def test_janitor_reclaims_idle_entries_of_a_consumer_with_a_live_heartbeat(
    redis_url: str,
) -> None:
    r = client(redis_url)
    q.create_job(r, "j", items(6), shard_size=2)
    dead = q.read_entries(r, [JOBS_STREAM], "dead", count=2)
    assert len(dead) == 2
    _beat(r, "dead")  # its heartbeat says alive and moving: only CLAIM_IDLE_MS can reclaim
    janitor = Janitor("alive", claim_idle_ms=100, max_deliveries=3, interval_s=0, trim_keep_ms=0)
    assert janitor.run(r) == []  # not idle long enough yet
    time.sleep(0.15)
    claimed = janitor.run(r)
    assert [e.entry_id for e in claimed] == [dead[0].entry_id]  # one shard per run
    assert janitor.delivery_counts(r, claimed) == {dead[0].entry_id: 2}
    assert [e.entry_id for e in janitor.run(r)] == [dead[1].entry_id]  # next run, next shard
    assert janitor.run(r) == []  # claiming reset their idle time: nothing is claimed twice
    assert pending_ids(r, JOBS_STREAM) == [dead[0].entry_id, dead[1].entry_id]
    owners = {q.text(p["consumer"]) for p in r.xpending_range(JOBS_STREAM, q.GROUP, "-", "+", 9)}
    assert owners == {"alive"}


def test_entries_of_a_consumer_without_heartbeat_or_stuck_are_taken_over_at_once(
    redis_url: str,
) -> None:
    r = client(redis_url)
    q.create_job(r, "j", items(6), shard_size=2)
    gone = q.read_entries(r, [JOBS_STREAM], "gone", count=1)  # no heartbeat: dead
    stuck = q.read_entries(r, [JOBS_STREAM], "stuck", count=1)
    moving = q.read_entries(r, [JOBS_STREAM], "moving", count=1)
    _beat(r, "stuck", progress_age_s=31.0)  # beating, but its loop silent past STALL_AFTER_S
    _beat(r, "moving", progress_age_s=1.0)
    janitor = Janitor("alive", claim_idle_ms=600_000, max_deliveries=3, interval_s=0,
                      trim_keep_ms=0, claim_counts={JOBS_STREAM: 5})  # fmt: skip
    assert sorted(janitor.orphaned_consumers(r, JOBS_STREAM)) == ["gone", "stuck"]
    claimed = janitor.run(r)
    assert {e.entry_id for e in claimed} == {gone[0].entry_id, stuck[0].entry_id}
    assert janitor.delivery_counts(r, claimed) == {e.entry_id: 2 for e in claimed}
    owners = {q.text(p["consumer"]) for p in r.xpending_range(JOBS_STREAM, q.GROUP, "-", "+", 9)}
    assert owners == {"alive", "moving"} and janitor.run(r) == []
    assert moving[0].entry_id not in {e.entry_id for e in claimed}


def test_poison_entry_goes_to_the_dlq_after_max_deliveries(redis_url: str) -> None:
    r = client(redis_url)
    q.create_job(r, "p", items(2))
    dead: list[tuple[str, int, str]] = []

    def janitor(name: str) -> Janitor:
        return Janitor(
            name,
            claim_idle_ms=50,
            max_deliveries=3,
            interval_s=0,
            trim_keep_ms=0,
            on_dead=lambda e, n, reason: dead.append((e.entry_id, n, reason)),
        )

    (entry,) = q.read_entries(r, [JOBS_STREAM], "crash-1", count=1)  # delivery 1
    for n, name in enumerate(["crash-2", "crash-3"], start=2):  # each claimer "crashes"
        time.sleep(0.07)
        assert [e.entry_id for e in janitor(name).run(r)] == [entry.entry_id]
        assert janitor(name).delivery_counts(r, [entry]) == {entry.entry_id: n}
    time.sleep(0.07)
    assert janitor("crash-4").run(r) == []  # 4th delivery is over the limit
    assert [d[:2] for d in dead] == [(entry.entry_id, 3)]
    assert "after 3 deliveries" in dead[0][2]
    assert pending_ids(r, JOBS_STREAM) == []
    (letter,) = r.xrange(DLQ_STREAM)
    fields = q.decode_fields(letter[1])
    assert fields["entry_id"] == entry.entry_id and fields["deliveries"] == "3"
    assert JobShard.from_fields(fields).job_id == "p"


def test_trimming_keeps_pending_and_undelivered_entries(redis_url: str) -> None:
    r = client(redis_url)
    q.create_job(r, "t", items(10), shard_size=1)
    first = q.read_entries(r, [JOBS_STREAM], "w", count=4)
    q.ack(r, JOBS_STREAM, [first[0].entry_id, first[2].entry_id, first[3].entry_id])
    assert q.trim_acked(r, JOBS_STREAM) == 1  # only entry 0: entry 1 is still pending
    assert pending_ids(r, JOBS_STREAM) == [first[1].entry_id]
    q.ack(r, JOBS_STREAM, [first[1].entry_id])
    assert q.trim_acked(r, JOBS_STREAM, keep_ms=60_000) == 0  # young entries are kept
    assert q.trim_acked(r, JOBS_STREAM) == 3
    assert r.xlen(JOBS_STREAM) == 6 and q.stream_depth(r, JOBS_STREAM) == 6
    assert len(q.read_entries(r, [JOBS_STREAM], "w", count=10)) == 6


def test_touch_and_hand_off(redis_url: str) -> None:
    r = client(redis_url)
    q.create_job(r, "h", items(4), shard_size=4)
    (entry,) = q.read_entries(r, [JOBS_STREAM], "w", count=1)
    time.sleep(0.05)
    q.touch(r, entry, "w")
    (row,) = r.xpending_range(JOBS_STREAM, q.GROUP, "-", "+", 10)
    assert row["times_delivered"] == 1 and row["time_since_delivered"] < 40
    shard = JobShard.from_fields(entry.fields or {})
    q.hand_off(r, entry, JobShard("h", shard.shard_no, shard.items[3:]))
    assert pending_ids(r, JOBS_STREAM) == []
    (rest,) = q.read_entries(r, [JOBS_STREAM], "w2", count=5)
    assert [i.image_id for i in JobShard.from_fields(rest.fields or {}).items] == ["img3"]


def test_enqueue_if_room_counts_waiting_and_pending_entries_atomically(redis_url: str) -> None:
    r = client(redis_url)
    for i in range(3):
        req = OnlineRequest(f"r{i}", "s" * 64, "ns", f"a{i}")
        assert q.enqueue_online_if_room(r, req, b"img", max_depth=3, image_ttl_s=60) is None
    assert r.get("butd:image:r0") == b"img" and 0 < r.ttl("butd:image:r0") <= 60
    q.read_entries(r, [ONLINE_STREAM], "w", count=1)  # one delivered (pending), two waiting
    assert q.stream_depth(r, ONLINE_STREAM) == 3 and q.pending_count(r)[ONLINE_STREAM] == 1
    late = OnlineRequest("r3", "s" * 64, "ns", "a3")
    assert q.enqueue_online_if_room(r, late, b"img", max_depth=3) == 3  # refused: full
    assert r.exists("butd:image:r3") == 0 and r.xlen(ONLINE_STREAM) == 3
    (entry,) = q.read_entries(r, [ONLINE_STREAM], "w", count=1)
    q.ack(r, ONLINE_STREAM, [entry.entry_id])  # one done: room for one more
    assert q.enqueue_online_if_room(r, late, b"img", max_depth=3) is None
    fields = OnlineRequest.from_fields(r.xrevrange(ONLINE_STREAM, count=1)[0][1])
    assert fields == OnlineRequest("r3", "s" * 64, "ns", "a3", image_key="butd:image:r3")
