"""Grid features through the real stack: POST /v1/features?grid_size, GET by id, a batch job and
its ``h5-grid`` export, with a real worker and Redis (the ``stack`` of test_gateway)."""

from __future__ import annotations

import hashlib
import io
import time
from typing import Any

import h5py
import numpy as np
import redis

from butd.service.encoding import decode_features
from butd.workers.protocol import ONLINE_STREAM
from tests.integration.test_gateway import (  # noqa: F401 (stack is a fixture)
    _wait_job,
    gateway,
    image_bytes,
    post,
    stack,
    wait_ready,
)

G = 3
REGION_KEYS = ("boxes", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "features")


def test_grid_option_returns_grids_with_the_same_regions_and_stores_them(
    stack: dict[str, Any],  # noqa: F811
) -> None:
    data = image_bytes(31)
    with gateway(stack) as client:
        wait_ready(client)
        plain = post(client, data, image_id="g", namespace="grid", dtype="float32")
        gridded = post(client, data, image_id="g", namespace="grid", dtype="float32", grid_size=G)
        assert plain.status_code == gridded.status_code == 200, gridded.text
        a, b = plain.json(), gridded.json()
        assert "grid" not in a or a["grid"] is None
        for key in REGION_KEYS:  # the regions are the same bytes
            assert a[key] == b[key], key
        assert a["model_version"] != b["model_version"]
        grid = decode_features(b["grid"])
        assert grid.shape == (G, G, decode_features(b["features"]).shape[1])
        r = redis.Redis.from_url(stack["redis"].url)
        deadline = time.monotonic() + 30
        while int(r.xpending(ONLINE_STREAM, "workers")["pending"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        by_id = client.get(
            "/v1/features/g",
            params={"namespace": "grid", "model_version": b["model_version"], "dtype": "float32"},
        )
        assert by_id.status_code == 200 and by_id.json()["cached"] is True
        assert by_id.json()["grid"] == b["grid"]
        npz = client.get(
            "/v1/features/g",
            params={"namespace": "grid", "model_version": b["model_version"]},
            headers={"accept": "application/x-npz"},
        )
        arrays = np.load(io.BytesIO(npz.content))
        np.testing.assert_array_equal(arrays["grid"].astype(np.float32), grid)
    assert b["sha256"] == hashlib.sha256(data).hexdigest()


def test_batch_job_with_grids_exports_the_grid_layout(stack: dict[str, Any]) -> None:  # noqa: F811
    folder = stack["data"] / "gridset"
    folder.mkdir(parents=True)
    for i, name in enumerate(["11.png", "12.png"]):
        (folder / name).write_bytes(image_bytes(40 + i))
    with gateway(stack) as client:
        wait_ready(client)
        body = {"paths": [str(folder)], "namespace": "gridset", "options": {"grid_size": G}}
        created = client.post("/v1/jobs", json=body)
        assert created.status_code == 201, created.text
        status = _wait_job(client, created.json()["job_id"])
        assert (status["state"], status["done"]) == ("done", 2)
        one = client.post(
            "/v1/features",
            content=(folder / "12.png").read_bytes(),
            params={"grid_size": G, "dtype": "float32"},
            headers={"content-type": "image/png"},
        ).json()
        assert one["cached"] is True  # the job stored it under the grid version
        version = one["model_version"]
        job = status["job_id"]
        refused = client.get(f"/v1/jobs/{job}/export?format=h5-grid")  # the region-only version
        # the current (region-only) version holds none of the job's images: 404, not a file
        assert refused.status_code == 404 and "none of the 2 images" in refused.text
        export = client.get(f"/v1/jobs/{job}/export?format=h5-grid&model_version={version}")
        assert export.status_code == 200, export.text
    out = stack["root"] / "grids.h5"
    out.write_bytes(export.content)
    with h5py.File(out, "r") as h5:
        cells = h5["12_grids"][()]
    np.testing.assert_array_equal(cells, decode_features(one["grid"]).reshape(G * G, -1))
