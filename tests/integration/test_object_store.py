"""Object storage on a local S3 server (moto): a job over an ``s3://`` prefix, its export
written to a bucket, and the shard store in a bucket read by a second gateway.

A real worker process (tiny random model, CPU) and real gateways (``create_app`` on the test's
redis-server) talk to moto through the standard AWS variables only.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from butd.service.app import create_app
from butd.service.encoding import decode_features
from butd.service.settings import Settings
from butd.store.readers import read_h5_ragged
from butd.workers import queue as q
from butd.workers.protocol import GROUP, JOBS_STREAM
from tests.integration.test_worker_e2e import image_bytes, start_worker, tiny_weights
from tests.redis_proc import free_port
from tests.s3_server import S3Server, moto_available

__all__ = ["start_worker", "tiny_weights"]  # fixtures used here

pytestmark = pytest.mark.skipif(not moto_available(), reason="needs moto[server] and s3fs")

N_IMAGES = 12


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The AWS variables set for this process and its children; fresh s3fs instances."""
    import s3fs

    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    return s3


@pytest.fixture
def redis_url(redis_proc: Any) -> str:
    return str(redis_proc.url)


def _fs() -> Any:
    import s3fs

    return s3fs.S3FileSystem()


def _gateway(tmp: Path, redis_url: str, **settings: Any) -> TestClient:
    app = create_app(
        Settings(
            redis_url=redis_url,
            store_dir=tmp,
            worker_cache_s=0.0,
            **settings,
        )
    )
    return TestClient(app)


def _wait_done(client: TestClient, job_id: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if body["state"] in ("done", "failed", "cancelled"):
            return body
        time.sleep(0.3)
    pytest.fail(f"job {job_id} did not finish: {body}")


def test_job_over_s3_prefix_exports_to_bucket_and_second_gateway_reads_bucket_store(
    s3_env: S3Server,
    redis_url: str,
    tmp_path: Path,
    start_worker: Callable[..., Any],
) -> None:
    s3 = s3_env
    for bucket in ("data", "feats", "out"):
        s3.make_bucket(bucket)
    fs = _fs()
    for i in range(N_IMAGES):
        fs.pipe(f"data/coco/val/{i:03d}.png", image_bytes(i))
    fs.pipe("data/coco/val/README.txt", b"not an image")
    fs.pipe("data/other/secret.png", image_bytes(99))

    worker = start_worker("w-s3", BUTD_STORE_URL="s3://feats/shards")
    settings = {
        "store_url": "s3://feats/shards",
        "allowed_urls": ["s3://data/coco"],
        "export_urls": ["s3://out/exports"],
    }
    with _gateway(tmp_path / "gw-a", redis_url, **settings) as gw_a:
        worker.wait_ready(q.connect(redis_url))
        refused = gw_a.post("/v1/jobs", json={"paths": ["s3://data/other"]})
        assert refused.status_code == 403 and "BUTD_ALLOWED_URLS" in refused.text
        climbing = gw_a.post("/v1/jobs", json={"paths": ["s3://data/coco/../other"]})
        assert climbing.status_code in (403, 422)

        created = gw_a.post("/v1/jobs", json={"paths": ["s3://data/coco/val"], "namespace": "c"})
        assert created.status_code == 201, created.text
        job = created.json()
        assert job["total"] == N_IMAGES
        assert [s["image_id"] for s in job["skipped"]] == ["README.txt"]
        status = _wait_done(gw_a, job["job_id"])
        assert (status["state"], status["done"], status["failed"]) == ("done", N_IMAGES, 0)

        bad = gw_a.post(f"/v1/jobs/{job['job_id']}/exports", json={"url": "s3://data/x.h5"})
        assert bad.status_code == 403
        written = gw_a.post(
            f"/v1/jobs/{job['job_id']}/exports",
            json={"url": "s3://out/exports/val.h5", "format": "h5-ragged"},
        )
        assert written.status_code == 201, written.text
        assert written.json()["records"] == N_IMAGES
        one_a = gw_a.get("/v1/features/005.png", params={"namespace": "c"}).json()

    # The export is in the bucket, readable the way a consumer reads the file.
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "val.h5"
        fs.get("out/exports/val.h5", str(local))
        assert local.stat().st_size == written.json()["bytes"]
        records = {rec.image_id: rec for rec in read_h5_ragged(local)}
        assert sorted(records) == [f"{i:03d}.png" for i in range(N_IMAGES)]
        exported = records["005.png"]

    # Shards live in the bucket only: nothing left in the worker's staging directory.
    shards = [p for p in fs.find("feats/shards") if p.endswith(".h5")]
    assert shards
    assert not list((tmp_path / "store" / "shards").glob("*.h5"))

    # A second gateway with an empty local store directory serves the record from the bucket.
    with _gateway(tmp_path / "gw-b", redis_url, store_url="s3://feats/shards") as gw_b:
        resp = gw_b.get("/v1/features/005.png", params={"namespace": "c", "dtype": "float32"})
        assert resp.status_code == 200, resp.text
        one_b = resp.json()
    assert not list((tmp_path / "gw-b" / "shards").glob("*.h5"))
    assert one_b["sha256"] == one_a["sha256"] == hashlib.sha256(image_bytes(5)).hexdigest()
    assert one_b["num_boxes"] == exported.num_boxes
    np.testing.assert_allclose(one_b["boxes"], exported.boxes, atol=1e-3)
    feats = decode_features(one_b["features"])
    np.testing.assert_array_equal(feats, exported.features.astype(np.float32))
    assert q.connect(redis_url).xpending(JOBS_STREAM, GROUP)["pending"] == 0


def test_read_source_reads_an_object_url(s3_env: S3Server) -> None:
    from butd.workers.sources import ObjectUrl, read_source

    s3_env.make_bucket("src")
    _fs().pipe("src/a/b.png", image_bytes(3))
    assert read_source(ObjectUrl("s3://src/a/b.png"), lambda key: None) == image_bytes(3)
    with pytest.raises(FileNotFoundError):
        read_source(ObjectUrl("s3://src/a/missing.png"), lambda key: None)


def test_an_unreachable_store_is_not_the_items_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    """Endpoint down: the read raises ObjectStoreUnavailableError, which ``load_task`` does not
    turn into an item failure (the entry stays pending and is retried), unlike a missing key."""
    import s3fs

    from butd.store.objects import ObjectStoreUnavailableError
    from butd.workers.sources import ObjectUrl, read_source

    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nobody listens
        "AWS_ACCESS_KEY_ID": "x",
        "AWS_SECRET_ACCESS_KEY": "x",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(ObjectStoreUnavailableError, match="cannot read"):
        read_source(ObjectUrl("s3://src/a/b.png"), lambda key: None)
    assert not issubclass(ObjectStoreUnavailableError, OSError | KeyError | ValueError)
    s3fs.S3FileSystem.clear_instance_cache()
