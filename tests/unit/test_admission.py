"""Admission by measured throughput, the decode pixel budget, stuck-worker readiness."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from butd.service.admission import admission
from butd.service.app import create_app
from butd.service.budget import BudgetTimeoutError, PixelBudget
from butd.service.settings import Settings
from butd.workers.batcher import Task
from butd.workers.options import ExtractOptions
from butd.workers.outcomes import Cached, Outcome
from butd.workers.protocol import Heartbeat
from butd.workers.queue import Entry
from butd.workers.sources import Uploaded
from tests.unit.app_fakes import FakeQueue, FakeStore, png_bytes


def beat(spi: float, **changes: object) -> Heartbeat:
    base = Heartbeat("w", "h", 1, "cpu", "v1", "m", True, updated_at=time.time())
    return replace(base, seconds_per_image=spi, **changes)  # type: ignore[arg-type]


def test_limit_is_what_the_workers_finish_within_the_deadline() -> None:
    # two workers at 0.1 and 0.2 s per image: 15 images/s; 30 s x 0.5 = 15 s -> 225 ahead
    got = admission([beat(0.1), beat(0.2)], timeout_s=30.0, margin=0.5, max_depth=1000)
    assert got.rate == pytest.approx(15.0) and got.limit == 225
    capped = admission([beat(0.001)], timeout_s=30.0, margin=0.5, max_depth=256)
    assert capped.limit == 256  # never above max_queue_depth
    slow = admission([beat(100.0)], timeout_s=30.0, margin=0.5, max_depth=256)
    assert slow.limit == 1  # an empty queue still admits one
    unmeasured = admission([beat(0.0)], timeout_s=30.0, margin=0.5, max_depth=256)
    assert (unmeasured.limit, unmeasured.rate) == (256, 0.0)


def test_refusal_says_the_wait_and_retry_after_is_the_drain_time() -> None:
    got = admission([beat(0.5)], timeout_s=10.0, margin=1.0, max_depth=100)  # 2/s, limit 20
    message, retry_after = got.refusal(depth=29, retry_after_s=2)
    assert "~15.0 s" in message and "2.00 images/s" in message and "limit 20" in message
    assert retry_after == 5  # (29 + 1 - 20) / 2


def test_overload_is_an_immediate_503_not_a_late_504(tmp_path: Path) -> None:
    store = FakeStore()
    queue = FakeQueue(store)
    queue.beats = [beat(1.0)]  # 1 image/s; 4 s x 0.5 -> 2 requests may be ahead
    queue.depth = 2
    settings = Settings(
        store_dir=tmp_path, redis_url="redis://unused", worker_cache_s=0.0,
        request_timeout_s=4.0, admission_margin=0.5,
    )  # fmt: skip
    with TestClient(create_app(settings, queue=queue, store=store)) as client:
        resp = client.post(
            "/v1/features", content=png_bytes(), headers={"content-type": "image/png"}
        )
        assert resp.status_code == 503 and resp.json()["error"] == "overloaded"
        assert int(resp.headers["retry-after"]) >= 2 and "images/s" in resp.json()["detail"]
        assert queue.enqueued == []
        queue.depth = 1
        ok = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
        assert ok.status_code == 200


def test_pixel_budget_bounds_what_is_held_at_once() -> None:
    budget = PixelBudget(100)
    held: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def decode(pixels: int) -> None:
        with budget.hold(pixels, timeout_s=30.0):
            with lock:
                held.append(pixels)
                peak[0] = max(peak[0], sum(held))
            time.sleep(0.01)
            with lock:
                held.remove(pixels)

    threads = [threading.Thread(target=decode, args=(p,)) for p in (60, 50, 40, 70, 30) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < peak[0] <= 100 and budget.held == 0
    with (
        pytest.raises(BudgetTimeoutError, match="exceed the whole budget"),
        budget.hold(101, timeout_s=1.0),
    ):
        pass
    with (
        budget.hold(100, timeout_s=1.0),
        pytest.raises(BudgetTimeoutError, match="waited"),
        budget.hold(1, timeout_s=0.05),
    ):
        pass


def test_settings_refuse_a_budget_below_the_pixel_limit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="decode_pixel_budget"):
        Settings(store_dir=tmp_path, max_pixels=1000, decode_pixel_budget=999)


@pytest.fixture
def stuck_client(tmp_path: Path) -> Iterator[tuple[TestClient, FakeQueue]]:
    store = FakeStore()
    queue = FakeQueue(store)
    settings = Settings(store_dir=tmp_path, redis_url="redis://unused", worker_cache_s=0.0)
    with TestClient(create_app(settings, queue=queue, store=store)) as client:
        yield client, queue


def test_a_stuck_worker_is_not_ready_and_not_admitted(
    stuck_client: tuple[TestClient, FakeQueue],
) -> None:
    client, queue = stuck_client
    now = time.time()
    queue.beats = [
        beat(0.1, progress_at=now - 300, stall_after_s=120.0, working_on="butd:jobs 5-0")
    ]
    ready = client.get("/health/ready")
    assert ready.status_code == 503
    body = ready.json()
    assert "stuck" in body["reason"] and "butd:jobs 5-0" in body["reason"]
    assert body["workers"][0]["stuck"] is True and body["workers"][0]["progress_age_s"] >= 299
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 503 and "no worker" in resp.json()["detail"]
    queue.beats = [beat(0.1, progress_at=now, stall_after_s=120.0)]
    assert client.get("/health/ready").status_code == 200


def test_the_worker_measures_seconds_per_image_and_its_loop_progress() -> None:
    from butd.workers.handlers import Counters
    from butd.workers.protocol import Heartbeat as Beat

    counters = Counters()
    before = counters.progress_at
    counters.count([_ok()] * 4, seconds=2.0)
    assert counters.seconds_per_image == pytest.approx(0.5)
    counters.count([_ok()] * 2, seconds=3.0)
    assert counters.seconds_per_image == pytest.approx(0.5 + Counters.SPI_WEIGHT * (1.5 - 0.5))
    assert counters.progress_at >= before and counters.images == 6
    counters.tick("butd:online 1-0")
    assert counters.working_on == "butd:online 1-0"
    now = time.time()
    fresh = Beat("w", "h", 1, "cpu", progress_at=now - 5, stall_after_s=10.0)
    silent = replace(fresh, progress_at=now - 11)
    never = replace(fresh, progress_at=0.0)  # an old worker that does not report progress
    assert [b.stalled(now) for b in (fresh, silent, never)] == [False, True, False]


def _ok() -> Outcome:
    task = Task(Entry("butd:online", "1-0", {}), "id", "ns", ExtractOptions(), Uploaded("k"))
    return Cached(task, "", "")
