"""One ``ExtractOptions`` for the gateway and the workers, validated where options enter a process:
HTTP parsing (the same 422 bodies as ever) and a worker reading the wire (the same messages)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from butd.service import schemas
from butd.service.app import create_app
from butd.service.settings import Settings
from butd.workers import protocol
from butd.workers.batcher import tasks_from_online
from butd.workers.options import MAX_BOXES, MAX_GRID_SIZE, ExtractOptions, bounds
from butd.workers.protocol import OnlineRequest, ProtocolError, decode_options
from butd.workers.queue import Entry
from tests.unit.app_fakes import FakeQueue, FakeStore, png_bytes


def test_one_class_on_both_sides_of_the_wire() -> None:
    """The HTTP schema, the stream messages and the job status hold the same class."""
    assert schemas.JobRequest.model_fields["options"].annotation is ExtractOptions
    assert type(OnlineRequest("r", "", "", "").options) is ExtractOptions
    assert type(protocol.JobShard("j", 0, ()).options) is ExtractOptions


def test_bounds_come_from_the_fields() -> None:
    assert bounds("min_boxes") == (1, MAX_BOXES) == bounds("max_boxes")
    assert bounds("conf_thresh") == (0.0, 1.0)
    assert bounds("grid_size") == (0, MAX_GRID_SIZE)


def test_the_wire_form_is_unchanged() -> None:
    """Sorted keys, only what is set, numbers as the old dataclass wrote them."""
    options = ExtractOptions(max_boxes=3, conf_thresh=1, min_boxes=2)  # type: ignore[arg-type]
    assert options.to_json() == '{"conf_thresh": 1.0, "max_boxes": 3, "min_boxes": 2}'
    assert decode_options(options.to_json()) == options
    assert hash(decode_options(options.to_json())) == hash(options)  # groups a batch by it
    assert decode_options('{"max_boxes": "36", "grid_size": null}') == ExtractOptions(max_boxes=36)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            '{"min_boxes": 0}',
            "bad extraction options {'min_boxes': 0}: min_boxes must be >= 1; got 0",
        ),
        (
            '{"min_boxes": 50, "max_boxes": 10}',
            "bad extraction options {'min_boxes': 50, 'max_boxes': 10}: "
            "need min_boxes <= max_boxes; got 50, 10",
        ),
        (
            '{"conf_thresh": -1}',
            "bad extraction options {'conf_thresh': -1}: conf_thresh must be in [0, 1]; got -1.0",
        ),
        (
            '{"conf_thresh": NaN}',
            "bad extraction options {'conf_thresh': nan}: conf_thresh must be in [0, 1]; got nan",
        ),
        (
            '{"grid_size": 33}',
            "bad extraction options {'grid_size': 33}: grid_size must be in [0, 32]; got 33",
        ),
        (
            '{"max_boxes": "many"}',
            "bad extraction options {'max_boxes': 'many'}: "
            "invalid literal for int() with base 10: 'many'",
        ),
        ('{"nms": 0.3}', "unknown extraction options ['nms']"),
        ("[1, 2]", "options must be a JSON object; got [1, 2]"),
    ],
)
def test_the_wire_reports_a_bad_value_in_its_old_words(raw: str, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode_options(raw)
    assert str(caught.value) == message


def test_a_bad_option_on_the_wire_fails_that_entry_with_the_message() -> None:
    fields = OnlineRequest("r1", "ab" * 32, "ns", "x", image_key="k").to_fields()
    fields["options"] = '{"min_boxes": 0}'
    with pytest.raises(ProtocolError, match=r"min_boxes must be >= 1; got 0$"):
        tasks_from_online(Entry("butd:online", "1-0", fields))


@pytest.mark.parametrize(
    ("form", "detail"),
    [
        ({"min_boxes": "0"}, "min_boxes: Input should be greater than or equal to 1"),
        ({"max_boxes": "5000"}, "max_boxes: Input should be less than or equal to 1000"),
        (
            {"min_boxes": "9", "max_boxes": "3"},
            "Value error, need min_boxes <= max_boxes; got 9 > 3",
        ),
    ],
)
def test_a_bad_form_option_is_the_same_422(
    tmp_path: Path, form: dict[str, str], detail: str
) -> None:
    queue = FakeQueue(FakeStore())
    settings = Settings(store_dir=f"{tmp_path}/store", redis_url="redis://unused")
    with TestClient(create_app(settings, queue=queue, store=queue.store)) as client:
        resp = client.post(
            "/v1/features", files={"file": ("a.png", png_bytes(), "image/png")}, data=form
        )
    assert resp.status_code == 422
    body = resp.json()
    assert (body["error"], body["detail"]) == (
        "invalid_request",
        f"bad extraction options: {detail}",
    )
    assert queue.enqueued == []


def test_the_gateway_enqueues_the_options_it_validated(tmp_path: Path) -> None:
    queue = FakeQueue(FakeStore())
    settings = Settings(store_dir=f"{tmp_path}/store", redis_url="redis://unused")
    with TestClient(create_app(settings, queue=queue, store=queue.store)) as client:
        resp = client.post(
            "/v1/features?max_boxes=7",
            files={"file": ("a.png", png_bytes(), "image/png")},
            data={"min_boxes": "2"},
        )
    assert resp.status_code == 200
    (request,) = queue.enqueued
    assert type(request.options) is ExtractOptions
    assert request.to_fields()["options"] == '{"max_boxes": 7, "min_boxes": 2}'


def test_the_grid_bound_is_the_detectors() -> None:
    """The gateway cannot import the detector, so the options keep a copy of its grid bound."""
    from butd.detector import config

    assert MAX_GRID_SIZE == config.MAX_GRID_SIZE
