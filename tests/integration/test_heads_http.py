"""/v1/caption and /v1/vqa end to end: real redis-server, a real worker process with heads.

Two tiny heads (hidden 16, 3 steps) are trained with ``butd heads train`` on 8 synthetic
scenes whose features have the tiny detector's size (D = 256), then a worker loads them
(``CAPTION_MODEL`` / ``VQA_MODEL``). An image is POSTed to /v1/features, then captioned and
questioned by id: the answers must equal ``butd.heads.inference`` run in the test on the record read
back from the store (same CPU kernels, same fp16 features: words and answers exactly, scores
and weights to 1e-5), each attention row must sum to 1 over the image's regions, and the boxes
must be the stored ones.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from butd.service.app import create_app
from butd.service.settings import Settings
from butd.store.index import FeatureIndex
from butd.store.records import FeatureRecord
from butd.store.shards import ShardReaders
from tests.heads_data import write_heads_dataset
from tests.integration.test_gateway import WorkerProc, image_bytes, wait_ready
from tests.redis_proc import RedisProcess

D = 256  # tests.tiny_weights: tiny_arch().feature_dim


def _train_heads(root: Path) -> tuple[Path, Path]:
    """Synthetic features and annotations, then one tiny caption and one tiny VQA head."""
    from butd.cli.main import main

    data = write_heads_dataset(root, dim=D, scenes=8)
    feats = data["features"]
    tiny = ["--steps", "3", "--hidden", "16", "--batch-size", "4", "--min-count", "1"]
    cap, vqa = root / "cap", root / "vqa"
    common = ["heads", "train"]
    assert main([*common, "caption", "--features", str(feats), "--annotations",
                 str(root / "karpathy.json"), "--out", str(cap), *tiny]) == 0  # fmt: skip
    assert main([*common, "vqa", "--features", str(feats), "--annotations", str(root / "a.json"),
                 "--questions", str(root / "q.json"), "--out", str(vqa), *tiny]) == 0  # fmt: skip
    return cap, vqa


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Redis + store + tiny weights + one worker serving both heads."""
    from tests.tiny_weights import make_tiny_weights

    root = tmp_path_factory.mktemp("heads_http")
    weights = make_tiny_weights(root / "tiny.safetensors")
    cap, vqa = _train_heads(root)
    (root / "redis").mkdir()
    server = RedisProcess(appendonly=True, directory=root / "redis")
    env = dict(os.environ)
    env.update(
        BUTD_REDIS_URL=server.url,
        BUTD_STORE_DIR=str(root / "store"),
        BUTD_WEIGHTS=str(weights),
        BUTD_DEVICE="cpu",
        BUTD_IDLE_BLOCK_MS="200",
        BUTD_HEARTBEAT_S="1",
        BUTD_HEARTBEAT_TTL_S="30",
        BUTD_WORKER_ID="heads-worker",
        BUTD_CAPTION_MODEL=str(cap),
        BUTD_VQA_MODEL=str(vqa),
    )
    worker = WorkerProc(env, root / "worker.log")
    worker.start()
    settings = Settings(
        redis_url=server.url,
        store_dir=root / "store",
        request_timeout_s=60.0,
        heartbeat_max_age_s=30.0,  # beats may come late on a loaded machine
    )
    try:
        with TestClient(create_app(settings)) as client:
            ready = wait_ready(client)
            yield {"root": root, "redis": server, "client": client, "cap": cap, "vqa": vqa,
                   "ready": ready}  # fmt: skip
    finally:
        worker.stop()
        server.stop()


def test_ready_reports_the_heads_the_worker_serves(stack: dict[str, Any]) -> None:
    body = stack["ready"]
    assert body["heads"] == {"caption": 1, "vqa": 1}
    (worker,) = body["workers"]
    assert worker["worker_id"] == "heads-worker" and worker["heads"] == ["caption", "vqa"]


def _stored(stack: dict[str, Any], version: str, sha256: str) -> FeatureRecord:
    """The record as sealed in the store (polled: the worker answers before sealing)."""
    index = FeatureIndex(redis.Redis.from_url(stack["redis"].url))
    deadline = time.monotonic() + 120  # a bound for a loaded machine, not a speed requirement
    while (location := index.lookup_content(version, sha256)) is None:
        assert time.monotonic() < deadline, "record never indexed"
        time.sleep(0.05)
    readers = ShardReaders(stack["root"] / "store" / "shards")
    try:
        return readers.get(location)
    finally:
        readers.close()


def _uploaded(stack: dict[str, Any]) -> tuple[FeatureRecord, dict[str, Any]]:
    resp = stack["client"].post(
        "/v1/features",
        content=image_bytes(7),
        params={"image_id": "pic", "namespace": "t"},
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return _stored(stack, resp.headers["X-Model-Version"], body["sha256"]), body


def _check_regions(body: dict[str, Any], record: FeatureRecord) -> None:
    n = record.num_boxes
    assert body["num_boxes"] == n and len(body["boxes"]) == n
    np.testing.assert_allclose(np.asarray(body["boxes"], np.float32), record.boxes, rtol=1e-6)
    att = np.asarray(body["attention"], np.float64)
    assert att.ndim == 2 and att.shape[1] == n
    np.testing.assert_allclose(att.sum(axis=1), 1.0, atol=1e-5)
    assert (att >= 0).all()
    assert (body["image_w"], body["image_h"]) == (record.image_w, record.image_h)


def test_caption_by_id_equals_inference_on_the_stored_record(stack: dict[str, Any]) -> None:
    from butd.heads.inference import caption, load_head

    record, features = _uploaded(stack)
    resp = stack["client"].post("/v1/caption", params={"image_id": "pic", "namespace": "t"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    model, meta = load_head(stack["cap"])
    expected = caption(model, meta, record)
    assert body["words"] == expected.words and body["caption"] == " ".join(expected.words)
    assert body["log_prob"] == pytest.approx(expected.log_prob, abs=1e-5)
    np.testing.assert_allclose(body["attention"], expected.attention.numpy(), atol=1e-5)
    assert body["sha256"] == features["sha256"] and body["cached"] is True
    assert len(body["attention"]) == len(expected.words)
    _check_regions(body, record)


def test_vqa_by_id_equals_inference_on_the_stored_record(stack: dict[str, Any]) -> None:
    from butd.heads.inference import answer, load_head

    record, _ = _uploaded(stack)
    question = "what color is the ball?"
    resp = stack["client"].post(
        "/v1/vqa", params={"image_id": "pic", "namespace": "t", "question": question}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    model, meta = load_head(stack["vqa"])
    expected = answer(model, meta, record, question)
    assert [a["answer"] for a in body["answers"]] == [a for a, _ in expected.answers]
    np.testing.assert_allclose(
        [a["score"] for a in body["answers"]], [s for _, s in expected.answers], atol=1e-5
    )
    assert body["answer"] == expected.answers[0][0] and len(body["answers"]) == 5
    np.testing.assert_allclose(body["attention"][0], expected.attention.numpy(), atol=1e-5)
    _check_regions(body, record)


def test_upload_is_extracted_then_captioned(stack: dict[str, Any]) -> None:
    data = image_bytes(8, w=100, h=80)
    resp = stack["client"].post("/v1/caption", files={"file": ("new.png", data, "image/png")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["cached"] is False and body["image_w"] == 100 and body["image_h"] == 80
    record = _stored(stack, body["model_version"], body["sha256"])
    _check_regions(body, record)
    missing = stack["client"].post("/v1/vqa", params={"sha256": "0" * 64, "question": "why?"})
    assert missing.status_code == 404, missing.text


def test_heads_server_answers_unavailable_and_missing_record(
    redis_url: str, tmp_path: Path
) -> None:
    from butd.workers.heads_protocol import HeadsRequest
    from butd.workers.heads_task import HeadsServer, LoadedHead

    fake = LoadedHead(model=None, meta={"task": "caption", "head": "updown"})
    server = HeadsServer(redis_url, tmp_path, {"caption": fake}, consumer="w1", record_wait_s=0.1)
    vqa = server.answer(HeadsRequest("r1", "vqa", "mv", "a" * 64, question="why?"))
    assert vqa.status == "unavailable" and vqa.reason == "no vqa model configured on worker w1"
    start = time.monotonic()
    missing = server.answer(HeadsRequest("r2", "caption", "mv", "a" * 64))
    assert missing.status == "error" and "no stored record of sha256" in missing.reason
    assert time.monotonic() - start >= 0.1  # it waited record_wait_s for the record
    late = server.answer(HeadsRequest("r3", "caption", "mv", "a" * 64, deadline_ms=1))
    assert late.status == "expired"
    server.readers.close()
