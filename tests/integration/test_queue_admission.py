"""Admission to the online and heads queues is atomic: concurrent enqueues never overshoot.

Each racing thread has its own client whose every command first waits at a shared barrier, so
the threads advance in lockstep: all finish their k-th command before any sends its (k+1)-th.
That is the worst interleaving for a read-then-write admission (every thread reads the same
depth, then every thread writes) and harmless for one atomic command, so the test fails
deterministically for check-then-add and passes for the Lua check-and-XADD.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

from butd.workers import queue as q
from butd.workers.heads_protocol import (
    HEADS_STREAM,
    HeadsRequest,
    HeadsResult,
    enqueue_heads,
    heads_result_key,
    post_heads_result,
    wait_heads_result,
)
from butd.workers.protocol import ONLINE_STREAM, OnlineRequest
from butd.workers.streams import enqueue_if_room, ensure_group

RACERS = 8
LIMIT = 4


class LockstepRedis(redis.Redis):
    """A client that waits at ``barrier`` before each command it sends."""

    barrier: threading.Barrier

    def execute_command(self, *args: Any, **options: Any) -> Any:
        self.barrier.wait(timeout=10)
        return super().execute_command(*args, **options)


def race(url: str, enqueue: Callable[[redis.Redis, int], int | None]) -> list[int | None]:
    """Run ``enqueue(client, i)`` for i in range(RACERS) in lockstep threads; their results."""
    barrier = threading.Barrier(RACERS)
    results: list[int | None] = [None] * RACERS
    errors: list[BaseException] = []

    def run(i: int) -> None:
        r = LockstepRedis.from_url(url)
        r.barrier = barrier
        try:
            results[i] = enqueue(r, i)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)
            barrier.abort()
        finally:
            r.close()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(RACERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return results


def heads_request(i: int) -> HeadsRequest:
    return HeadsRequest(f"h{i}", "caption", "m", "s" * 64)


def test_heads_admission_admits_exactly_up_to_the_limit_under_a_race(redis_url: str) -> None:
    r = q.connect(redis_url)
    ensure_group(r, HEADS_STREAM)
    for i in range(LIMIT - 1):  # one place left (this also loads the script)
        assert enqueue_heads(r, heads_request(100 + i), max_depth=LIMIT) is None
    results = race(redis_url, lambda c, i: enqueue_heads(c, heads_request(i), max_depth=LIMIT))
    assert sum(res is None for res in results) == 1
    assert sorted(res for res in results if res is not None) == [LIMIT] * (RACERS - 1)
    assert r.xlen(HEADS_STREAM) == LIMIT
    assert q.stream_depth(r, HEADS_STREAM) == LIMIT


def test_online_admission_admits_exactly_up_to_the_limit_under_a_race(redis_url: str) -> None:
    r = q.connect(redis_url)
    q.ensure_groups(r)

    def online(c: redis.Redis, i: int) -> int | None:
        req = OnlineRequest(f"r{i}", "s" * 64, "ns", f"a{i}")
        return q.enqueue_online_if_room(c, req, b"img", max_depth=LIMIT, image_ttl_s=60)

    for i in range(LIMIT - 1):
        assert online(r, 100 + i) is None
    results = race(redis_url, online)
    assert sum(res is None for res in results) == 1
    assert r.xlen(ONLINE_STREAM) == LIMIT
    assert len(list(r.scan_iter(match="butd:image:*"))) == LIMIT  # refused bytes never stored


def test_heads_queue_counts_waiting_and_pending_and_keeps_its_wire_format(redis_url: str) -> None:
    r = q.connect(redis_url)
    assert q.stream_depth(r, HEADS_STREAM) == 0  # no stream yet
    ensure_group(r, HEADS_STREAM)
    for i in range(3):
        assert enqueue_heads(r, heads_request(i), max_depth=3) is None
    (entry,) = q.read_entries(r, [HEADS_STREAM], "w", count=1)  # one pending, two waiting
    assert HeadsRequest.from_fields(entry.fields or {}) == heads_request(0)
    assert entry.fields == heads_request(0).to_fields()
    assert q.stream_depth(r, HEADS_STREAM) == 3
    assert enqueue_heads(r, heads_request(3), max_depth=3) == 3  # full: refused
    q.ack(r, HEADS_STREAM, [entry.entry_id])  # one answered: room for one more
    assert enqueue_heads(r, heads_request(3), max_depth=3) is None
    assert r.xlen(HEADS_STREAM) == 4 and q.stream_depth(r, HEADS_STREAM) == 3


def test_heads_answers_travel_through_the_shared_reply_list(redis_url: str) -> None:
    r = q.connect(redis_url)
    assert wait_heads_result(r, "h1", 0.05) is None  # nobody answered
    answer = HeadsResult("h1", "ok", words=["a", "dog"], answers=[("yes", 0.9)])
    post_heads_result(r, answer, ttl_s=60)
    assert 0 < r.ttl(heads_result_key("h1")) <= 60
    assert wait_heads_result(r, "h1", 1.0) == answer
    assert r.exists(heads_result_key("h1")) == 0  # popped


def test_a_capped_stream_is_trimmed_as_entries_are_admitted(redis_url: str) -> None:
    r = q.connect(redis_url)
    for i in range(300):
        assert enqueue_if_room(r, "butd:test", {"n": str(i)}, max_depth=1000, maxlen=10) is None
    assert 10 <= r.xlen("butd:test") < 300  # MAXLEN ~: whole macro nodes are dropped
    assert r.xrevrange("butd:test", count=1)[0][1] == {b"n": b"299"}
