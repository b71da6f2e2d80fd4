"""Gateway routes against in-memory fakes of the queue and the store (no Redis, no worker)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import load as safetensors_load

from butd.service.app import create_app
from butd.service.encoding import decode_features
from butd.service.settings import Settings
from butd.workers.protocol import OnlineRequest, OnlineResult
from tests.unit.app_fakes import (
    MODEL_VERSION,
    OBJECTS,
    FakeQueue,
    FakeStore,
    make_record,
    png_bytes,
)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def queue(store: FakeStore) -> FakeQueue:
    return FakeQueue(store)


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "store_dir": tmp_path / "store",
        "redis_url": "redis://unused",
        "worker_cache_s": 0.0,  # tests change the fake heartbeats between requests
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def client(tmp_path: Path, queue: FakeQueue, store: FakeStore) -> Iterator[TestClient]:
    app = create_app(_settings(tmp_path), queue=queue, store=store)
    with TestClient(app) as c:
        yield c


def test_upload_multipart_reaches_worker_and_returns_record(
    client: TestClient, queue: FakeQueue
) -> None:
    data = png_bytes()
    resp = client.post(
        "/v1/features", files={"file": ("a.png", data, "image/png")}, data={"image_id": "img-1"}
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    expected = make_record("img-1")
    assert body["image_id"] == "img-1" and body["namespace"] == "default"
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["cached"] is False and resp.headers["x-cache"] == "miss"
    assert body["num_boxes"] == 5 and body["model_version"] == MODEL_VERSION
    assert body["objects"] == [OBJECTS[i] for i in expected.objects_id]
    feats = decode_features(body["features"])
    assert feats.dtype == np.float16 and feats.shape == (5, 8)
    np.testing.assert_array_equal(feats, expected.features)
    np.testing.assert_allclose(body["boxes"], expected.boxes, atol=1e-3)
    assert len(queue.enqueued) == 1 and queue.enqueued[0].image_id == "img-1"
    assert resp.headers["x-request-id"] == body["request_id"]


def test_second_upload_is_a_cache_hit_without_worker(client: TestClient, queue: FakeQueue) -> None:
    data = png_bytes(seed=3)
    first = client.post("/v1/features", content=data, headers={"content-type": "image/png"})
    assert first.status_code == 200
    queue.beats = []  # every worker gone
    second = client.post(
        "/v1/features?image_id=again", content=data, headers={"content-type": "image/png"}
    )
    assert second.status_code == 200, second.text
    assert second.json()["cached"] is True and second.headers["x-cache"] == "hit"
    assert len(queue.enqueued) == 1
    # the alias written on the hit makes the id readable
    got = client.get("/v1/features/again")
    assert got.status_code == 200 and got.json()["sha256"] == first.json()["sha256"]


def test_float32_json_and_binary_formats(client: TestClient) -> None:
    data = png_bytes(seed=4)
    resp = client.post(
        "/v1/features?dtype=float32", content=data, headers={"content-type": "image/png"}
    )
    feats = decode_features(resp.json()["features"])
    assert feats.dtype == np.float32 and resp.json()["features"]["dtype"] == "float32"
    sha = resp.json()["sha256"]
    npz = client.get(f"/v1/features/sha256/{sha}", headers={"accept": "application/x-npz"})
    assert npz.headers["content-type"] == "application/x-npz"
    arrays = np.load(io.BytesIO(npz.content))
    np.testing.assert_array_equal(arrays["features"].astype(np.float32), feats)
    assert json.loads(str(arrays["metadata"]))["sha256"] == sha
    st = client.get(f"/v1/features/sha256/{sha}", headers={"accept": "application/x-safetensors"})
    assert st.status_code == 200
    tensors = safetensors_load(st.content)
    np.testing.assert_array_equal(tensors["boxes"], arrays["boxes"])
    assert tensors["image_size"].tolist() == [32, 24]


def test_options_skip_cache_and_reach_worker(client: TestClient, queue: FakeQueue) -> None:
    data = png_bytes(seed=5)
    client.post("/v1/features", content=data, headers={"content-type": "image/png"})
    resp = client.post(
        "/v1/features?min_boxes=2&max_boxes=3&conf_thresh=0.5",
        content=data,
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200
    assert len(queue.enqueued) == 2
    assert queue.enqueued[1].options.overrides() == {
        "min_boxes": 2,
        "max_boxes": 3,
        "conf_thresh": 0.5,
    }


@pytest.mark.parametrize(
    "query",
    ["min_boxes=0", "max_boxes=5000", "conf_thresh=1.5", "min_boxes=9&max_boxes=3"],
)
def test_option_ranges_are_validated(client: TestClient, query: str) -> None:
    resp = client.post(
        f"/v1/features?{query}", content=png_bytes(), headers={"content-type": "image/png"}
    )
    assert resp.status_code == 422
    assert resp.json()["error"] == "invalid_request"
    detail = resp.json()["detail"]
    assert ": :" not in detail and ":  " not in detail, detail
    if "min_boxes=9" in query:
        assert "need min_boxes <= max_boxes; got 9 > 3" in detail, detail


def test_body_too_large_is_413(tmp_path: Path, queue: FakeQueue, store: FakeStore) -> None:
    app = create_app(_settings(tmp_path, max_body_bytes=1000), queue=queue, store=store)
    with TestClient(app) as c:
        resp = c.post("/v1/features", content=b"x" * 5000, headers={"content-type": "image/png"})
        assert resp.status_code == 413 and "5000 bytes" in resp.json()["detail"]
        multi = c.post("/v1/features", files={"file": ("a.png", b"x" * 5000, "image/png")})
        assert multi.status_code == 413
    assert queue.enqueued == []


def test_too_many_pixels_is_413_with_value_and_limit(
    tmp_path: Path, queue: FakeQueue, store: FakeStore
) -> None:
    app = create_app(_settings(tmp_path, max_pixels=500), queue=queue, store=store)
    with TestClient(app) as c:
        resp = c.post(
            "/v1/features", content=png_bytes(40, 30), headers={"content-type": "image/png"}
        )
    assert resp.status_code == 413
    assert resp.json()["error"] == "too_many_pixels"
    assert "1200" in resp.json()["detail"] and "500" in resp.json()["detail"]


def test_not_an_image_is_415_and_truncated_is_422(
    tmp_path: Path, queue: FakeQueue, store: FakeStore
) -> None:
    app = create_app(_settings(tmp_path, full_decode_check=True), queue=queue, store=store)
    with TestClient(app) as client:
        resp = client.post(
            "/v1/features", content=b"hello, not an image", headers={"content-type": "image/png"}
        )
        assert resp.status_code == 415 and resp.json()["error"] == "not_an_image"
        jpeg = png_bytes(64, 64, fmt="JPEG")
        resp = client.post(
            "/v1/features", content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"}
        )
        assert resp.status_code == 422 and resp.json()["error"] == "corrupt_image"
        assert resp.json()["detail"]
        wrong = client.post("/v1/features", content=b"{}", headers={"content-type": "text/plain"})
        assert wrong.status_code == 415
    assert queue.enqueued == []


def test_by_default_the_gateway_reads_only_the_header(client: TestClient, queue: FakeQueue) -> None:
    """A truncated file passes the header probe and reaches the worker, which reports it."""
    jpeg = png_bytes(64, 64, fmt="JPEG")
    queue.worker = lambda request, data: OnlineResult(request.request_id, "error", reason="trunc")
    resp = client.post(
        "/v1/features", content=jpeg[: len(jpeg) // 2], headers={"content-type": "image/jpeg"}
    )
    assert resp.status_code == 422 and "trunc" in resp.json()["detail"]
    assert len(queue.enqueued) == 1


def test_queue_full_and_no_worker_are_503_with_retry_after(
    client: TestClient, queue: FakeQueue
) -> None:
    queue.depth = 10_000
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 503 and resp.headers["retry-after"] == "2"
    assert "10000" in resp.json()["detail"]
    queue.depth, queue.beats = 0, []
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 503 and "no worker" in resp.json()["detail"]
    assert queue.enqueued == []


def test_timeout_is_504_with_request_id(client: TestClient, queue: FakeQueue) -> None:
    queue.worker = lambda request, data: None
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 504
    body = resp.json()
    assert body["request_id"] == resp.headers["x-request-id"] == queue.enqueued[0].request_id
    assert body["sha256"] in body["detail"]


def test_worker_error_is_422_with_reason(client: TestClient, queue: FakeQueue) -> None:
    def failing(request: OnlineRequest, data: bytes) -> OnlineResult:
        return OnlineResult(request.request_id, "error", reason="cannot decode: boom")

    queue.worker = failing
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 422 and "boom" in resp.json()["detail"]


def test_unknown_ids_are_404(client: TestClient) -> None:
    assert client.get("/v1/features/nope").status_code == 404
    assert client.get(f"/v1/features/sha256/{'0' * 64}").status_code == 404
    assert client.get("/v1/features/sha256/xyz").status_code == 422


def test_image_ids_with_slashes_and_namespaces(client: TestClient) -> None:
    data = png_bytes(seed=9)
    resp = client.post(
        "/v1/features",
        files={"file": ("x.png", data, "image/png")},
        data={"image_id": "val/0001.jpg", "namespace": "coco"},
    )
    assert resp.status_code == 200
    assert client.get("/v1/features/val/0001.jpg?namespace=coco").status_code == 200
    assert client.get("/v1/features/val/0001.jpg").status_code == 404
    bad = client.post(
        "/v1/features?namespace=a%20b", content=data, headers={"content-type": "image/png"}
    )
    assert bad.status_code == 422


def test_api_keys_guard_v1_but_not_health(
    tmp_path: Path, queue: FakeQueue, store: FakeStore
) -> None:
    app = create_app(_settings(tmp_path, api_keys=["k1", "k2"]), queue=queue, store=store)
    with TestClient(app) as c:
        assert c.get("/v1/features/x").status_code == 401
        wrong = c.get("/v1/features/x", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        ok = c.get("/v1/features/x", headers={"authorization": "Bearer k2"})
        assert ok.status_code == 404  # authenticated, then unknown
        assert c.get("/health/live").status_code == 200
        assert c.get("/health/ready").status_code == 200
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/jobs/abc").status_code == 401


def test_idempotency_key_is_echoed(client: TestClient) -> None:
    resp = client.post(
        "/v1/features",
        content=png_bytes(),
        headers={"content-type": "image/png", "idempotency-key": "abc-123"},
    )
    assert resp.headers["idempotency-key"] == "abc-123"
    assert len(resp.headers["x-request-id"]) == 32


def test_ready_reports_reasons(client: TestClient, queue: FakeQueue) -> None:
    assert client.get("/health/ready").json()["ready"] is True
    queue.beats = [queue.beats[0].__class__(**{**queue.beats[0].__dict__, "loaded": False})]
    resp = client.get("/health/ready")
    assert resp.status_code == 503 and "loaded" in resp.json()["reason"]
    queue.up = False
    resp = client.get("/health/ready")
    assert resp.status_code == 503 and "redis" in resp.json()["reason"]
    assert client.get("/health/live").status_code == 200


def test_ready_counts_live_workers_per_head(client: TestClient, queue: FakeQueue) -> None:
    w1 = queue.beats[0]
    queue.beats = [
        dataclasses.replace(w1, heads=("vqa", "caption")),
        dataclasses.replace(w1, worker_id="w2", heads=("caption",)),
        dataclasses.replace(w1, worker_id="w3", heads=()),
        dataclasses.replace(w1, worker_id="w4", heads=("vqa",), loaded=False),  # not counted
    ]
    body = client.get("/health/ready").json()
    assert body["heads"] == {"caption": 2, "vqa": 1}
    assert [w["heads"] for w in body["workers"]] == [["caption", "vqa"], ["caption"], [], ["vqa"]]
    queue.beats = [dataclasses.replace(w1, heads=())]
    resp = client.get("/health/ready")
    assert resp.status_code == 200  # extraction is ready without any head
    assert resp.json()["heads"] == {"caption": 0, "vqa": 0}
    queue.up = False
    assert client.get("/health/ready").json()["heads"] == {"caption": 0, "vqa": 0}


def test_redis_down_is_503_on_v1(client: TestClient, queue: FakeQueue) -> None:
    queue.up = False
    resp = client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    assert resp.status_code == 503 and resp.json()["error"] == "redis_unavailable"


def test_metrics_count_responses_by_route_and_status(client: TestClient) -> None:
    client.get("/v1/features/a")
    client.get("/v1/features/b")
    client.post("/v1/features", content=png_bytes(), headers={"content-type": "image/png"})
    text = client.get("/metrics").text
    assert (
        'butd_http_responses_total{method="GET",route="/v1/features/{image_id:path}",'
        'status="404"} 2.0' in text
    )
    assert 'route="/v1/features",status="200"' in text
    assert "butd_queue_depth 0.0" in text and "butd_live_workers 1.0" in text
    assert 'butd_worker_images_total{device="cpu",worker="w1"} 0.0' in text


def test_openapi_docs_are_served(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/v1/features", "/v1/jobs", "/health/ready"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_every_reference_in_the_openapi_spec_resolves(client: TestClient) -> None:
    """ReDoc refuses the whole page over one dangling ``$ref`` (Swagger UI only warns)."""
    spec = client.get("/openapi.json").json()
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(spec)))
    assert "JobRequest" in refs
    assert refs <= set(spec["components"]["schemas"]), refs - set(spec["components"]["schemas"])


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_scripts_from_the_gateway_not_a_cdn(
    client: TestClient, page: str
) -> None:
    html = client.get(page).text
    sources = re.findall(r'(?:src|href)="([^"]+)"', html)
    assets = [s for s in sources if s.endswith((".js", ".css"))]
    assert assets, html
    for url in assets:
        assert url.startswith("/"), f"{page} loads {url} from another host"
        body = client.get(url)
        assert body.status_code == 200 and len(body.content) > 10_000, url
    assert "https://" not in "".join(assets)


def test_image_id_bound_to_other_bytes_is_409(client: TestClient, queue: FakeQueue) -> None:
    first = post_png(client, png_bytes(seed=21), image_id="same")
    assert first.status_code == 200
    again = post_png(client, png_bytes(seed=21), image_id="same")
    assert again.status_code == 200 and again.json()["cached"] is True
    other = post_png(client, png_bytes(seed=22), image_id="same")
    assert other.status_code == 409 and first.json()["sha256"] in other.json()["detail"]
    assert len(queue.enqueued) == 1
    anonymous = post_png(client, png_bytes(seed=23))
    assert (
        anonymous.json()["namespace"] is None
        and anonymous.json()["image_id"] == (anonymous.json()["sha256"])
    )
    assert queue.enqueued[-1].namespace == ""  # no alias bound for an upload without id


def post_png(client: TestClient, data: bytes, **params: str) -> httpx.Response:
    return client.post(
        "/v1/features", content=data, params=params, headers={"content-type": "image/png"}
    )


def test_an_answer_with_its_record_is_rendered_without_the_store(
    client: TestClient, queue: FakeQueue, store: FakeStore
) -> None:
    record = make_record("pushed", n=3, d=4, seed=5)

    def answering(request: OnlineRequest, data: bytes) -> OnlineResult:
        # answered before the seal: nothing in the store yet
        return OnlineResult(
            request.request_id, "ok", MODEL_VERSION, request.content_sha256, 3, record=record
        )

    queue.worker = answering
    data = png_bytes(seed=11)
    sha = hashlib.sha256(data).hexdigest()
    resp = client.post(
        "/v1/features",
        content=data,
        params={"image_id": "p1", "namespace": "ns"},
        headers={"content-type": "image/png"},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["cached"] is False and body["num_boxes"] == 3
    assert body["objects"] == [OBJECTS[i] for i in record.objects_id]
    assert body["model"]["description"] == "fake model"  # from the published ModelMeta
    assert np.array_equal(decode_features(body["features"]), record.features)
    assert store.records == {}  # the store was never read nor written by the gateway
    assert store.remembered[(MODEL_VERSION, sha)].record is record
    assert store.remembered_aliases == {("ns", "p1"): sha}


def test_an_answer_without_published_vocabularies_falls_back_to_the_store(
    client: TestClient, queue: FakeQueue, store: FakeStore
) -> None:
    queue.meta.clear()

    def answering(request: OnlineRequest, data: bytes) -> OnlineResult:
        stored = store.put(request.content_sha256, make_record(request.image_id, seed=2))
        return OnlineResult(
            request.request_id, "ok", MODEL_VERSION, request.content_sha256, 5, record=stored.record
        )

    queue.worker = answering
    resp = client.post(
        "/v1/features", content=png_bytes(seed=12), headers={"content-type": "image/png"}
    )
    assert resp.status_code == 200 and resp.json()["objects"][0] in OBJECTS
    assert store.remembered == {}  # rendered from the store's copy, with its vocabularies


def test_online_phase_histograms_come_from_the_worker_timings(
    client: TestClient, queue: FakeQueue
) -> None:
    def answering(request: OnlineRequest, data: bytes) -> OnlineResult:
        now = time.time()
        timings = {"t_batch": now - 0.020, "t_extracted": now - 0.005, "t_replied": now - 0.004}
        result = queue.store_worker(request, data)
        return dataclasses.replace(result, timings=timings)

    queue.worker = answering
    resp = client.post(
        "/v1/features", content=png_bytes(seed=13), headers={"content-type": "image/png"}
    )
    assert resp.status_code == 200
    metrics = client.get("/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in metrics.splitlines()
        if line.startswith("butd_online_") and "_sum" in line
    }
    assert 0.0149 <= values["butd_online_compute_seconds_sum"] <= 0.0151
    assert values["butd_online_reply_seconds_sum"] >= 0.004
    assert "butd_online_queue_seconds_sum" in values
