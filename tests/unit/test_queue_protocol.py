"""The queue's messages: encodings round-trip, bad values are refused with the rule and value."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest

from butd.workers.options import ExtractOptions
from butd.workers.protocol import (
    Heartbeat,
    JobItem,
    JobShard,
    OnlineRequest,
    OnlineResult,
    ProtocolError,
    decode_options,
    job_state,
    shard_items,
)
from butd.workers.wire import ARRAYS, MAGIC, ModelMeta, decode_result, encode_result, stored_form


def as_redis_returns(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_online_request_round_trips_through_bytes_fields() -> None:
    req = OnlineRequest(
        "r-1",
        "f" * 64,
        "coco",
        "img/1.jpg",
        ExtractOptions(min_boxes=10, max_boxes=36, conf_thresh=0.3),
        1700,
        "butd:image:r-1",
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
    assert decode_options('{"conf_thresh": 0.5}') == ExtractOptions(conf_thresh=0.5)


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
        decode_options(raw)


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
    code = "import sys, butd.workers.queue, butd.workers.jobs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_worker_settings_read_prefixed_and_bare_names(monkeypatch: pytest.MonkeyPatch) -> None:
    from butd.workers.settings import WorkerSettings

    monkeypatch.setenv("BATCH_SIZE", "4")
    monkeypatch.setenv("BUTD_CLAIM_IDLE_MS", "2500")
    monkeypatch.setenv("BUTD_EXTRACTION", '{"max_boxes": 36}')
    s = WorkerSettings(_env_file=None)
    assert (s.batch_size, s.claim_idle_ms, s.max_deliveries) == (4, 2500, 3)
    assert s.extraction == {"max_boxes": 36} and s.worker_id  # host-pid by default
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        WorkerSettings(_env_file=None, heartbeat_s=10, heartbeat_ttl_s=5)


def test_a_result_with_its_record_round_trips_byte_for_byte() -> None:
    from tests.unit.app_fakes import make_record

    record = make_record("img", n=3, d=5)
    res = OnlineResult("r", "ok", record.model_version, "s" * 64, num_boxes=3, record=record)
    res = replace(res, timings={"t_batch": 1.5, "t_extracted": 1.75, "t_replied": 1.8})
    data = encode_result(res)
    assert data.startswith(MAGIC) and not data.startswith(b"{")
    back = decode_result(data)
    assert back == res and back.timings == res.timings  # ``record`` is not compared: check it
    assert back.record is not None
    for name in ARRAYS:
        a, b = getattr(record, name), getattr(back.record, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert (back.record.image_id, back.record.image_w) == ("img", record.image_w)
    empty = replace(record, **{k: getattr(record, k)[:0] for k in ARRAYS})
    assert decode_result(encode_result(replace(res, record=empty))).record.num_boxes == 0  # type: ignore[union-attr]


def test_results_without_a_record_stay_json_and_bad_binary_is_refused() -> None:
    res = OnlineResult("r", "error", reason="boom")
    assert encode_result(res) == res.to_json().encode()
    assert decode_result(res.to_json()) == res
    from tests.unit.app_fakes import make_record

    good = encode_result(replace(res, status="ok", record=make_record("x")))
    with pytest.raises(ProtocolError, match="malformed binary result"):
        decode_result(good[:-3])  # truncated arrays
    with pytest.raises(ProtocolError, match="trailing"):
        decode_result(good + b"xx")


def test_stored_form_rounds_features_like_the_fp16_store() -> None:
    from tests.unit.app_fakes import make_record

    rec = make_record("x")
    wide = replace(
        rec,
        features=np.linspace(-3, 3, rec.features.size, dtype=np.float32).reshape(
            rec.features.shape
        ),
    )
    narrow = stored_form(wide, "float16")
    assert narrow.features.dtype == np.float16
    assert np.array_equal(narrow.features, wide.features.astype(np.float16))
    assert stored_form(narrow, "float16") is narrow
    assert ModelMeta.from_json(ModelMeta(("a",), ("b",), "d").to_json()) == ModelMeta(
        ("a",), ("b",), "d"
    )
