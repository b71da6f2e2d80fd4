"""The Python client and the ``butd jobs`` / ``butd get`` commands against the fake-backed app."""

from __future__ import annotations

import argparse
import io
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from butd.cli import jobs as jobs_cli
from butd.cli import summaries
from butd.cli.main import main as cli_main
from butd.client import ButdError, Client, to_record
from butd.service.app import create_app
from butd.service.settings import Settings
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
    assert queue.store.export_options == {"ids": "consumer"}
    client.export("j1", "h5-dense", tmp_path / "d.h5", ids="stored", allow_padding=True)
    assert queue.store.export_options == {"ids": "stored", "allow_padding": True}


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
    assert jobs_cli.run_get(parser.parse_args(["get", "cli-img", "--json"])) == 0
    full = json.loads(capsys.readouterr().out)
    assert np.asarray(full["features"]).shape == (5, 8) and len(full["boxes"]) == 5
    assert jobs_cli.run_get(parser.parse_args(["get", "cli-img"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cli-img (default): 5 regions, features 5x8 float16"), lines
    assert len(lines) == 2 + 5  # header, column names, one line per region (5 <= SHOWN)


def test_get_summary_fits_a_screen_however_many_regions(
    http: TestClient, queue: FakeQueue, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(jobs_cli, "_client", lambda: _cli_client(http))
    queue.store.put("f" * 64, make_record("many", n=100))
    queue.store.add_alias("default", "many", "f" * 64)
    assert jobs_cli.run_get(_parser().parse_args(["get", "many"])) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + summaries.SHOWN + 1, lines
    assert lines[-1].strip().startswith("... 90 more (--out FILE.npz")
    confs = [float(line.split()[0]) for line in lines[2:-1]]
    assert confs == sorted(confs, reverse=True)  # the most confident regions first


@pytest.fixture
def uploads_only(tmp_path: Path, queue: FakeQueue) -> Iterator[TestClient]:
    """A gateway that reads no server paths (BUTD_ALLOWED_ROOTS empty, as ``make serve``)."""
    settings = Settings(store_dir=tmp_path / "store", redis_url="redis://unused")
    with TestClient(create_app(settings, queue=queue, store=queue.store)) as c:
        yield c


def test_submit_uploads_and_says_so_when_the_gateway_reads_no_server_paths(
    uploads_only: TestClient,
    queue: FakeQueue,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: Any,
) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(png_bytes(seed=31))
    (photos / "sub" / "b.png").write_bytes(png_bytes(seed=32))
    monkeypatch.setattr(jobs_cli, "_client", lambda: _cli_client(uploads_only, key=None))
    args = _parser().parse_args(["jobs", "submit", str(photos), "--namespace", "mine"])
    with caplog.at_level(logging.WARNING):
        assert jobs_cli.run_submit(args) == 0
    assert "uploading" in caplog.text and "BUTD_ALLOWED_ROOTS is empty" in caplog.text
    (job_id,) = queue.job_items
    assert sorted(i.image_id for i in queue.job_items[job_id]) == ["a.jpg", "sub/b.png"]
    assert capsys.readouterr().out.startswith(f"job {job_id} queued: 2 images")


def test_refusal_names_both_ways_out_and_restricted_gateway_gets_no_upload(
    http: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, queue: FakeQueue
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "c.jpg").write_bytes(png_bytes(seed=33))
    monkeypatch.setattr(jobs_cli, "_client", lambda: _cli_client(http))
    with _cli_client(http) as c, pytest.raises(ButdError) as info:
        c.submit_job([outside], "x")
    assert "--upload" in info.value.detail and "BUTD_ALLOWED_ROOTS" in info.value.detail
    # A gateway that reads some roots keeps its rule: the CLI does not upload behind its back.
    assert jobs_cli.run_submit(_parser().parse_args(["jobs", "submit", str(outside)])) == 1
    assert queue.job_items == {}


def test_http_request_lines_are_logged_only_with_verbose(
    http: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(jobs_cli, "_client", lambda: _cli_client(http))
    httpx_logger = logging.getLogger("httpx")
    monkeypatch.setattr(httpx_logger, "level", httpx_logger.level)  # restored afterwards
    for verbose, expected in ((False, False), (True, True)):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            cli_main((["-v"] if verbose else []) + ["get", "missing"])
        assert ("HTTP Request:" in caplog.text) is expected, caplog.text


def _cli_client(http: TestClient, key: str | None = "secret") -> Client:
    return Client("http://testserver", key, transport=http._transport)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    jobs_cli.register(parser.add_subparsers(dest="command"))
    return parser
