"""The Python client and the ``butd jobs`` / ``butd get`` commands against the fake-backed app."""

from __future__ import annotations

import argparse
import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from butd.client import ButdError, Client, to_record
from service.app import create_app
from service.cli import jobs as jobs_cli
from service.settings import Settings
from tests.unit.app_fakes import FakeQueue, FakeStore, make_record, png_bytes


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue(FakeStore())


@pytest.fixture
def http(tmp_path: Path, queue: FakeQueue) -> Iterator[TestClient]:
    (tmp_path / "data").mkdir()
    settings = Settings(
        store_dir=tmp_path / "store",
        redis_url="redis://unused",
        allowed_roots=[tmp_path / "data"],
        api_keys=["secret"],
    )
    with TestClient(create_app(settings, queue=queue, store=queue.store)) as c:
        yield c


@pytest.fixture
def client(http: TestClient) -> Iterator[Client]:
    with Client("http://testserver", "secret", transport=http._transport) as c:
        yield c


def test_extract_get_and_to_record(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(seed=11))
    regions = client.extract(path, image_id="a", namespace="ns")
    expected = make_record("a")
    assert regions["features"].dtype == np.float16 and regions["features"].shape == (5, 8)
    np.testing.assert_array_equal(regions["features"], expected.features)
    np.testing.assert_allclose(regions["boxes"], expected.boxes, atol=1e-3)
    record = to_record(client.get("a", "ns"))
    assert record.image_id == "a" and record.num_boxes == 5
    again = client.get_by_sha256(regions["sha256"], dtype="float32")
    assert again["features"].dtype == np.float32


def test_errors_carry_status_code_and_retry_after(client: Client, queue: FakeQueue) -> None:
    with pytest.raises(ButdError) as info:
        client.get("missing")
    assert info.value.status_code == 404 and info.value.error == "not_found"
    queue.depth = 10**6
    with pytest.raises(ButdError) as info:
        client.extract(png_bytes(seed=12))
    assert info.value.status_code == 503 and info.value.retry_after == 2.0


def test_wrong_key_is_401(http: TestClient) -> None:
    with (
        Client("http://testserver", "wrong", transport=http._transport) as c,
        pytest.raises(ButdError) as info,
    ):
        c.get("x")
    assert info.value.status_code == 401


def test_jobs_roundtrip(client: Client, queue: FakeQueue, tmp_path: Path) -> None:
    (tmp_path / "data" / "x.jpg").write_bytes(png_bytes(seed=13))
    created = client.submit_job([tmp_path / "data"], "ds", idempotency_key="j1")
    assert created["job_id"] == "j1" and created["total"] == 1
    assert client.job("j1")["state"] == "queued"
    assert client.cancel("j1")["state"] == "cancelled"
    final = client.wait_job("j1", progress=False, poll_s=0.01)
    assert final["state"] == "cancelled"
    out = client.export("j1", "tsv", tmp_path / "out.tsv")
    assert out.read_text() == "x.jpg"


def test_archive_submit(client: Client, queue: FakeQueue) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("p/q.jpg", png_bytes(seed=14))
    created = client.submit_archive(buf.getvalue(), "zipped", min_boxes=3)
    items = queue.job_items[created["job_id"]]
    assert [i.image_id for i in items] == ["p/q.jpg"]


def test_cli_get_and_status(
    http: TestClient,
    client: Client,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    client.extract(png_bytes(seed=15), image_id="cli-img")
    monkeypatch.setattr(
        jobs_cli,
        "_client",
        lambda: Client("http://testserver", "secret", transport=http._transport),
    )
    parser = _parser()
    out = tmp_path / "x.npz"
    assert jobs_cli.run_get(parser.parse_args(["get", "cli-img", "--out", str(out)])) == 0
    with np.load(out) as npz:
        assert npz["features"].shape == (5, 8)
    assert jobs_cli.run_get(parser.parse_args(["get", "missing"])) == 1
    capsys.readouterr()
    assert jobs_cli.run_get(parser.parse_args(["get", "cli-img"])) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["features"] == {"shape": [5, 8], "dtype": "float16"}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    jobs_cli.register(parser.add_subparsers(dest="command"))
    return parser
