"""The queue's messages: encodings round-trip, bad values are refused with the rule and value."""

from __future__ import annotations

import subprocess
import sys

import pytest

from workers.protocol import (
    ExtractOptions,
    Heartbeat,
    JobItem,
    JobShard,
    OnlineRequest,
    OnlineResult,
    ProtocolError,
    job_state,
    shard_items,
)


def as_redis_returns(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_online_request_round_trips_through_bytes_fields() -> None:
    req = OnlineRequest(
        "r-1", "f" * 64, "coco", "img/1.jpg", ExtractOptions(10, 36, 0.3), 1700, "butd:image:r-1"
    )
    assert OnlineRequest.from_fields(as_redis_returns(req.to_fields())) == req


def test_job_shard_round_trips() -> None:
    shard = JobShard(
        "job",
        2,
        (JobItem("/d/a.jpg", "a"), JobItem("/d/x.zip::b.png", "b")),
        ExtractOptions(max_boxes=36),
        "ns",
    )
    assert JobShard.from_fields(as_redis_returns(shard.to_fields())) == shard


def test_options_keep_only_what_is_set() -> None:
    assert ExtractOptions().to_json() == "{}"
    assert ExtractOptions(max_boxes=36).overrides() == {"max_boxes": 36}
    assert ExtractOptions.from_json('{"conf_thresh": 0.5}') == ExtractOptions(conf_thresh=0.5)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"min_boxes": 0}', "min_boxes must be >= 1"),
        ('{"min_boxes": 50, "max_boxes": 10}', "min_boxes <= max_boxes"),
        ('{"conf_thresh": 1.5}', "conf_thresh must be in"),
        ('{"nms": 0.3}', "unknown extraction options"),
        ('{"max_boxes": "many"}', "bad extraction options"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_bad_options_are_refused(raw: str, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        ExtractOptions.from_json(raw)


def test_malformed_entries_are_protocol_errors() -> None:
    with pytest.raises(ProtocolError, match="request_id"):
        OnlineRequest.from_fields({b"image_key": b"k"})
    with pytest.raises(ProtocolError, match="deadline_ms"):
        OnlineRequest.from_fields({"request_id": "r", "deadline_ms": "soon"})
    with pytest.raises(ProtocolError, match="bad job shard"):
        JobShard.from_fields({"job_id": "j", "shard_no": "0", "items": "[{}]"})


def test_results_and_heartbeats_round_trip() -> None:
    res = OnlineResult("r", "expired", reason="late")
    assert OnlineResult.from_json(res.to_json().encode()) == res
    with pytest.raises(ProtocolError):
        OnlineResult.from_json('{"request_id": "r", "status": "maybe"}')
    beat = Heartbeat("w", "h", 7, "cuda:0", "abc", "R101", True, 3, 40, 1, 5.0, 6.0)
    assert Heartbeat.from_json(beat.to_json()) == beat
    assert Heartbeat.from_json(
        '{"worker_id": "w", "host": "h", "pid": 1, "device": "cpu", "new": 1}'
    )


def test_job_states_and_sharding() -> None:
    assert job_state(b"running") == "running"
    with pytest.raises(ProtocolError, match="unknown job state"):
        job_state("paused")
    items = [JobItem(f"/{i}", str(i)) for i in range(5)]
    assert [len(s) for s in shard_items(items, 2)] == [2, 2, 1]
    with pytest.raises(ProtocolError):
        shard_items(items, 0)


def test_queue_module_does_not_import_torch() -> None:
    code = "import sys, workers.queue, workers.jobs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_worker_settings_read_prefixed_and_bare_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from workers.settings import WorkerSettings

    monkeypatch.setenv("BATCH_SIZE", "4")
    monkeypatch.setenv("BUTD_CLAIM_IDLE_MS", "2500")
    monkeypatch.setenv("BUTD_EXTRACTION", '{"max_boxes": 36}')
    s = WorkerSettings(_env_file=None)
    assert (s.batch_size, s.claim_idle_ms, s.max_deliveries) == (4, 2500, 3)
    assert s.extraction == {"max_boxes": 36} and s.worker_id  # host-pid by default
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        WorkerSettings(_env_file=None, heartbeat_s=10, heartbeat_ttl_s=5)
