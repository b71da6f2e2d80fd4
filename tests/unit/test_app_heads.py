"""/v1/caption and /v1/vqa against in-memory fakes (no Redis, no worker)."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from butd.service.app import create_app
from butd.service.settings import Settings
from butd.workers.heads_protocol import HeadsRequest, HeadsResult
from tests.unit.app_fakes import MODEL_VERSION, FakeQueue, FakeStore, make_record, png_bytes

SHA = "ab" * 32


@pytest.fixture
def store() -> FakeStore:
    s = FakeStore()
    s.put(SHA, make_record("img1", n=7))
    s.add_alias("default", "img1", SHA)
    return s


@pytest.fixture
def queue(store: FakeStore) -> FakeQueue:
    return FakeQueue(store)


@pytest.fixture
def client(tmp_path: Path, queue: FakeQueue, store: FakeStore) -> Iterator[TestClient]:
    settings = Settings(
        store_dir=tmp_path / "store", redis_url="redis://unused", worker_cache_s=0.0
    )
    with TestClient(create_app(settings, queue=queue, store=store)) as c:
        yield c


def test_caption_by_image_id_has_words_attention_and_boxes(
    client: TestClient, queue: FakeQueue
) -> None:
    r = client.post("/v1/caption", params={"image_id": "img1", "beam_size": 3, "max_len": 7})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"] == "a cat" and body["words"] == ["a", "cat"]
    assert body["num_boxes"] == 7 and len(body["boxes"]) == 7
    assert len(body["attention"]) == 2 and all(len(row) == 7 for row in body["attention"])
    assert body["sha256"] == SHA and body["image_id"] == "img1" and body["cached"] is True
    (sent,) = queue.heads_enqueued
    assert (sent.task, sent.content_sha256, sent.model_version) == ("caption", SHA, MODEL_VERSION)
    assert (sent.beam_size, sent.max_len) == (3, 7)


def test_vqa_by_sha256_returns_best_and_top_answers(client: TestClient, queue: FakeQueue) -> None:
    r = client.post("/v1/vqa", params={"sha256": SHA.upper(), "question": "is it a cat?"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["answer"], body["score"]) == ("yes", 0.9)
    assert [a["answer"] for a in body["answers"]] == ["yes", "no"]
    assert body["question"] == "is it a cat?" and len(body["attention"]) == 1
    assert queue.heads_enqueued[0].question == "is it a cat?"


def test_upload_is_extracted_first_then_captioned(client: TestClient, queue: FakeQueue) -> None:
    data = png_bytes(seed=3)
    r = client.post("/v1/caption", files={"file": ("x.png", data, "image/png")})
    assert r.status_code == 200, r.text
    sha = hashlib.sha256(data).hexdigest()
    assert len(queue.enqueued) == 1 and queue.enqueued[0].content_sha256 == sha
    assert r.json()["sha256"] == sha and r.json()["cached"] is False
    assert queue.heads_enqueued[0].content_sha256 == sha


def test_grid_heads_get_the_upload_extracted_with_grids(
    client: TestClient, queue: FakeQueue
) -> None:
    files = {"file": ("x.png", png_bytes(seed=5), "image/png")}
    r = client.post("/v1/caption", files=files, params={"grid_size": 7})
    assert r.status_code == 200, r.text
    assert queue.enqueued[0].options.grid_size == 7  # the worker computes the grid
    named = client.post("/v1/caption", params={"image_id": "img1", "grid_size": 7})
    assert named.status_code == 422 and "upload the image" in named.json()["detail"]
    assert client.post("/v1/vqa", files=files, params={"grid_size": 33}).status_code == 422


def test_vqa_upload_takes_question_from_form(client: TestClient, queue: FakeQueue) -> None:
    files = {"file": ("x.png", png_bytes(seed=4), "image/png")}
    r = client.post("/v1/vqa", files=files, data={"question": "what is it?", "image_id": "u1"})
    assert r.status_code == 200, r.text
    assert r.json()["question"] == "what is it?" and r.json()["image_id"] == "u1"


@pytest.mark.parametrize(
    ("path", "params", "status"),
    [
        ("/v1/caption", {"image_id": "nope"}, 404),
        ("/v1/caption", {"sha256": "cd" * 32}, 404),
        ("/v1/caption", {"sha256": "xyz"}, 422),
        ("/v1/caption", {"image_id": "img1", "namespace": "bad ns"}, 422),
        ("/v1/caption", {"image_id": "img1", "beam_size": 0}, 422),
        ("/v1/caption", {}, 422),
        ("/v1/vqa", {"image_id": "img1"}, 422),
        ("/v1/vqa", {"image_id": "img1", "question": "  "}, 422),
    ],
)
def test_validation(
    client: TestClient, queue: FakeQueue, path: str, params: dict[str, object], status: int
) -> None:
    r = client.post(path, params=params)
    assert r.status_code == status, r.text
    assert "detail" in r.json()
    assert not queue.heads_enqueued


def test_no_worker_serves_the_head_is_503_with_the_reason(
    client: TestClient, queue: FakeQueue
) -> None:
    queue.beats = [dataclasses.replace(queue.beats[0], heads=("vqa",))]
    r = client.post("/v1/caption", params={"image_id": "img1"})
    assert r.status_code == 503
    assert r.json()["error"] == "head_unavailable"
    assert "no caption model configured on any worker" in r.json()["detail"]
    assert not queue.heads_enqueued


def test_heads_queue_full_is_503_with_retry_after(client: TestClient, queue: FakeQueue) -> None:
    queue.heads_depth = 10_000
    r = client.post("/v1/vqa", params={"image_id": "img1", "question": "why?"})
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"
    assert "heads queue is full" in r.json()["detail"]


@pytest.mark.parametrize(
    ("answer", "status", "code"),
    [
        (None, 504, "timeout"),
        (HeadsResult("x", "expired", reason="late"), 504, "timeout"),
        (HeadsResult("x", "unavailable", reason="no caption model on w9"), 503, "head_unavailable"),
        (HeadsResult("x", "error", reason="boom"), 422, "worker_error"),
    ],
)
def test_worker_answers_are_mapped(
    client: TestClient, queue: FakeQueue, answer: HeadsResult | None, status: int, code: str
) -> None:
    def worker(request: HeadsRequest) -> HeadsResult | None:
        return (
            None if answer is None else dataclasses.replace(answer, request_id=request.request_id)
        )

    queue.heads_worker = worker
    r = client.post("/v1/caption", params={"image_id": "img1"})
    assert r.status_code == status, r.text
    assert r.json()["error"] == code
    if answer is not None and status != 504:
        assert answer.reason in r.json()["detail"]


def test_client_caption_and_answer_by_id_hash_and_upload(
    client: TestClient, queue: FakeQueue
) -> None:
    from butd.client import ButdError, Client

    with Client("http://testserver", transport=client._transport) as c:
        cap = c.caption("img1", beam_size=2)
        assert cap["caption"] == "a cat" and cap["num_boxes"] == 7
        ans = c.answer("is it?", sha256=SHA, top=1)
        assert ans["answer"] == "yes" and len(ans["answers"]) == 1
        up = c.caption(image=png_bytes(seed=9))
        assert up["cached"] is False
        with pytest.raises(ButdError) as err:
            c.caption("missing")
        assert err.value.status_code == 404
        with pytest.raises(ValueError, match="image_id, sha256 or image"):
            c.answer("why?")
    assert [(r.task, r.beam_size, r.top) for r in queue.heads_enqueued] == [
        ("caption", 2, 5),
        ("vqa", 5, 1),
        ("caption", 5, 5),
    ]


def test_cli_caption_and_answer_ask_the_gateway(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from butd.cli import heads as cli
    from butd.cli.main import main
    from butd.client import Client

    def gateway(args: object) -> Client:
        return Client("http://testserver", transport=client._transport)

    monkeypatch.setattr(cli, "_gateway", gateway)
    assert main(["caption", "img1", "--namespace", "default"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["caption"] == "a cat" and "attention" not in out
    assert main(["answer", SHA, "--sha256", "is it?", "--top", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == "yes" and [a["answer"] for a in out["answers"]] == ["yes", "no"]
    with pytest.raises(SystemExit, match="404"):
        main(["caption", "missing"])
    with pytest.raises(SystemExit, match=r"no feature file f\.h5"):  # local: demo head default
        main(["caption", "img1", "--features", "f.h5"])


def test_heads_protocol_round_trips_and_rejects_malformed_entries() -> None:
    from butd.workers.heads_protocol import HeadsRequest, HeadsResult
    from butd.workers.protocol import Heartbeat, ProtocolError

    req = HeadsRequest("r1", "vqa", "mv", SHA, question="why?", top=3, deadline_ms=5)
    fields = {k.encode(): v.encode() for k, v in req.to_fields().items()}
    assert HeadsRequest.from_fields(fields) == req
    with pytest.raises(ProtocolError, match="needs a question"):
        HeadsRequest("r2", "vqa", "mv", SHA)
    with pytest.raises(ProtocolError, match="task must be one of"):
        HeadsRequest.from_fields({**req.to_fields(), "task": "draw"})
    with pytest.raises(ProtocolError, match="malformed"):
        HeadsRequest.from_fields({"request_id": "r3"})
    res = HeadsResult("r1", "ok", answers=[("yes", 0.5)], attention=[[0.25] * 4])
    assert HeadsResult.from_json(res.to_json()) == res
    with pytest.raises(ProtocolError, match="bad heads result status"):
        HeadsResult.from_json('{"request_id": "r1", "status": "maybe"}')
    old = '{"worker_id": "w", "host": "h", "pid": 1, "device": "cpu"}'
    assert Heartbeat.from_json(old).heads == ()
    beat = Heartbeat("w", "h", 1, "cpu", heads=("caption",))
    assert Heartbeat.from_json(beat.to_json()) == beat
