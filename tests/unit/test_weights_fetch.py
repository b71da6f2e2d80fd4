"""``fetch`` against a local HTTP server: every format, resume after a cut, bad hashes."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import pickle
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import torch

from butd.detector.config import tiny_arch
from butd.detector.weights import REGISTRY, WeightsError, load
from butd.detector.weights import fetch as fetch_module
from butd.detector.weights.fetch import download, fetch
from butd.detector.weights.formats import CONVERTERS
from butd.detector.weights.registry import RegistryEntry
from tests.unit import synthetic_checkpoints as synth

TINY = tiny_arch()


class _Handler(BaseHTTPRequestHandler):
    """Serves ``files``; honours ``Range: bytes=N-`` unless ``ignore_range``; can cut once."""

    files: ClassVar[dict[str, bytes]] = {}
    cut_once: ClassVar[set[str]] = set()
    ignore_range: ClassVar[bool] = False
    requests: ClassVar[list[tuple[str, str | None]]] = []

    def do_GET(self) -> None:
        range_header = self.headers.get("Range")
        self.requests.append((self.path, range_header))
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start = 0
        if range_header and not self.ignore_range:
            start = int(range_header.removeprefix("bytes=").rstrip("-"))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if self.path in self.cut_once:
            self.cut_once.discard(self.path)
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.close()
            return
        self.wfile.write(payload)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(autouse=True)
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The back-off pauses ``download`` asked for, recorded instead of slept."""
    asked: list[float] = []
    monkeypatch.setattr(fetch_module, "_sleep", asked.append)
    return asked


@pytest.fixture
def server() -> Iterator[str]:
    _Handler.files, _Handler.cut_once, _Handler.requests = {}, set(), []
    _Handler.ignore_range = False
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def _payload(fmt: str) -> tuple[bytes, Any, str]:
    """(file bytes, the checkpoint object, publisher's file name) for a tiny checkpoint."""
    if fmt == "airsplay":
        obj: Any = synth.airsplay_checkpoint(TINY)
        return pickle.dumps(obj, protocol=2), obj, "faster_rcnn_from_caffe_attr.pkl"
    buf = io.BytesIO()
    if fmt == "hf":
        obj, name = synth.hf_state_dict(TINY), "pytorch_model.bin"
    else:
        obj, name = synth.milvlg_checkpoint(TINY), "bua-caffe-frcn-r101-k36.pth"
    torch.save(obj, buf)
    return buf.getvalue(), obj, name


def _entry(fmt: str, url: str, filename: str, sha256: str | None = None) -> RegistryEntry:
    return RegistryEntry(
        name=f"test-{fmt}",
        filename=filename,
        format=fmt,
        urls=(url,),
        sha256=sha256,
        boxes="36",
        description=f"tiny {fmt}",
        arch=TINY,
        vocab=None,
    )


@pytest.mark.parametrize("fmt", ["airsplay", "hf", "milvlg"])
def test_fetch_each_format(server: str, tmp_path: Path, fmt: str) -> None:
    data, obj, name = _payload(fmt)
    _Handler.files[f"/{name}"] = data
    sha = hashlib.sha256(data).hexdigest()
    out = fetch(_entry(fmt, f"{server}/{name}", name, sha), tmp_path, progress=False)
    assert out == tmp_path / f"test-{fmt}.safetensors"
    loaded = load(out)
    assert (loaded.source_format, loaded.source_sha256) == (fmt, sha)
    expected = CONVERTERS[fmt](obj, arch=TINY).state_dict
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())
    assert not (tmp_path / name).exists()  # source removed unless keep_source
    _Handler.requests.clear()
    assert fetch(_entry(fmt, f"{server}/{name}", name, sha), tmp_path, progress=False) == out
    assert _Handler.requests == []  # already converted: nothing downloaded


def test_interrupted_download_resumes_with_a_range_request(server: str, tmp_path: Path) -> None:
    data, _, name = _payload("milvlg")
    _Handler.files[f"/{name}"] = data
    _Handler.cut_once.add(f"/{name}")
    sha = hashlib.sha256(data).hexdigest()
    entry = _entry("milvlg", f"{server}/{name}", name, sha)
    out = fetch(entry, tmp_path, progress=False, keep_source=True)
    assert load(out).source_sha256 == sha
    assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == sha
    (_, first_range), (_, resume_range) = _Handler.requests
    assert first_range is None
    assert resume_range == f"bytes={len(data) // 2}-"


def test_server_ignoring_range_restarts_from_zero(server: str, tmp_path: Path) -> None:
    data, _, name = _payload("hf")
    _Handler.files[f"/{name}"] = data
    _Handler.cut_once.add(f"/{name}")
    _Handler.ignore_range = True
    dest = download((f"{server}/{name}",), tmp_path / name, progress=False)
    assert dest.read_bytes() == data
    assert [r for _, r in _Handler.requests] == [None, f"bytes={len(data) // 2}-"]


def test_partial_file_from_an_earlier_run_is_continued(server: str, tmp_path: Path) -> None:
    data, _, name = _payload("hf")
    _Handler.files[f"/{name}"] = data
    (tmp_path / f"{name}.part").write_bytes(data[:1000])
    with httpx.Client() as client:
        download((f"{server}/{name}",), tmp_path / name, client=client, progress=False)
    assert (tmp_path / name).read_bytes() == data
    assert _Handler.requests == [(f"/{name}", "bytes=1000-")]


def test_wrong_sha256_raises_and_deletes_the_download(server: str, tmp_path: Path) -> None:
    data, _, name = _payload("airsplay")
    _Handler.files[f"/{name}"] = data
    entry = _entry("airsplay", f"{server}/{name}", name, "0" * 64)
    with pytest.raises(WeightsError, match="expected 0000") as info:
        fetch(entry, tmp_path, progress=False)
    assert hashlib.sha256(data).hexdigest() in str(info.value)
    assert not (tmp_path / name).exists()
    assert not (tmp_path / "test-airsplay.safetensors").exists()


def test_second_url_used_when_first_is_missing(server: str, tmp_path: Path) -> None:
    data, _, name = _payload("hf")
    _Handler.files[f"/mirror/{name}"] = data
    entry = dataclasses.replace(
        _entry("hf", "", name), urls=(f"{server}/gone/{name}", f"{server}/mirror/{name}")
    )
    assert load(fetch(entry, tmp_path, progress=False)).source_format == "hf"


def test_all_urls_failing_is_one_error(server: str, tmp_path: Path) -> None:
    entry = _entry("hf", f"{server}/gone.bin", "gone.bin")
    with pytest.raises(WeightsError, match="HTTP 404"):
        fetch(entry, tmp_path, progress=False)


def test_unsupported_entries_fail_before_downloading(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="no attribute head"):
        fetch(REGISTRY["airsplay-noattr-36"], tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_cli_fetch_and_list(
    server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from butd.cli import weights as cli

    data, _, name = _payload("airsplay")
    _Handler.files[f"/{name}"] = data
    entry = _entry("airsplay", f"{server}/{name}", name)
    monkeypatch.setitem(REGISTRY, entry.name, entry)
    parser = argparse.ArgumentParser(prog="butd")
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["weights", "fetch", entry.name, "--dir", str(tmp_path)])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out
    assert hashlib.sha256(data).hexdigest() in printed
    args = parser.parse_args(["weights", "list", "--dir", str(tmp_path)])
    assert args.handler(args) == 0
    listing = capsys.readouterr().out
    ready = next(line for line in listing.splitlines() if line.startswith(entry.name))
    assert "ready" in ready
    assert "airsplay-attr-36" in listing


def test_retries_back_off_exponentially_instead_of_firing_at_once(
    tmp_path: Path, waits: list[float]
) -> None:
    attempts: list[str] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(str(request.url))
        raise httpx.ConnectError("connection refused", request=request)

    with (
        httpx.Client(transport=httpx.MockTransport(refuse)) as client,
        pytest.raises(WeightsError, match="connection refused"),
    ):
        download(("http://mirror/w.bin",), tmp_path / "w.bin", client=client, retries=4)
    assert len(attempts) == 5  # the first try and 4 resumptions
    assert waits == [1.0, 2.0, 4.0, 8.0]  # a pause before each resumption, none before the first
    assert fetch_module.backoff_delays(8)[-1] == fetch_module.BACKOFF_MAX_S


def test_a_cut_download_waits_once_before_resuming(
    server: str, tmp_path: Path, waits: list[float]
) -> None:
    data, _, name = _payload("hf")
    _Handler.files[f"/{name}"] = data
    _Handler.cut_once.add(f"/{name}")
    assert download((f"{server}/{name}",), tmp_path / name, progress=False).read_bytes() == data
    assert waits == [1.0]
