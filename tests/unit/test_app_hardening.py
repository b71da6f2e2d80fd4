"""Hostile and careless inputs at the gateway edge (fake queue, real files): one name rule,
job paths that used to 500, idempotency keys bound to their request, upload cleanup and budget.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from butd.service.app import create_app
from butd.service.settings import Settings
from butd.store import ids
from butd.workers.protocol import JobStatus
from tests.unit.app_fakes import FakeQueue, FakeStore, png_bytes


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "set").mkdir(parents=True)
    (data / "set" / "a.jpg").write_bytes(png_bytes(seed=1))
    (data / "other").mkdir()
    (data / "other" / "b.jpg").write_bytes(png_bytes(seed=2))
    return data


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue(FakeStore())


def _client(tmp_path: Path, roots: Path, queue: FakeQueue, **extra: Any) -> TestClient:
    settings = Settings(
        store_dir=tmp_path / "store",
        redis_url="redis://unused",
        allowed_roots=[roots],
        **extra,
    )
    return TestClient(create_app(settings, queue=queue, store=queue.store))


@pytest.fixture
def client(tmp_path: Path, roots: Path, queue: FakeQueue) -> Iterator[TestClient]:
    with _client(tmp_path, roots, queue) as c:
        yield c


def _error(resp: Any, status: int, code: str) -> str:
    """The detail of an error answer, after checking it has the one documented shape."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) >= {"error", "detail"} and body["error"] == code, body
    assert isinstance(body["detail"], str) and body["detail"]
    return str(body["detail"])


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _uploads(tmp_path: Path) -> list[str]:
    root = tmp_path / "store" / "jobs" / "uploads"
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) if root.exists() else []


# --- one name rule -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["a\x00b", "tab\there", "line\nbreak", "x" * (ids.MAX_IMAGE_ID_CHARS + 1)]
)
def test_a_bad_image_id_is_refused_alike_in_query_and_form(
    client: TestClient, queue: FakeQueue, bad: str
) -> None:
    data = png_bytes(seed=3)
    by_query = client.post(
        "/v1/features",
        content=data,
        params={"image_id": bad},
        headers={"content-type": "image/png"},
    )
    by_form = client.post("/v1/features", files={"file": ("x.png", data)}, data={"image_id": bad})
    for resp in (by_query, by_form):
        assert "printable characters" in _error(resp, 422, "invalid_name")
    assert queue.enqueued == []  # nothing reached a worker


def test_the_longest_image_id_passes_and_is_readable(client: TestClient) -> None:
    good = "é" * ids.MAX_IMAGE_ID_CHARS
    resp = client.post(
        "/v1/features", files={"file": ("x.png", png_bytes())}, data={"image_id": good}
    )
    assert resp.status_code == 200, resp.text
    assert client.get(f"/v1/features/{good}").status_code == 200
    _error(client.get("/v1/features/a%00b"), 422, "invalid_name")


@pytest.mark.parametrize("namespace", ["my photos", "n" * 65, "ns/sub"])
def test_a_bad_namespace_is_refused_in_query_form_and_job(
    client: TestClient, roots: Path, namespace: str
) -> None:
    data = png_bytes(seed=4)
    resp = client.post("/v1/features", files={"file": ("x.png", data)},
                       data={"image_id": "x", "namespace": namespace})  # fmt: skip
    assert "A-Z a-z 0-9" in _error(resp, 422, "invalid_name")
    resp = client.get("/v1/features/x", params={"namespace": namespace})
    _error(resp, 422, "invalid_name")
    job = client.post("/v1/jobs", json={"paths": [str(roots / "set")], "namespace": namespace})
    assert "A-Z a-z 0-9" in _error(job, 422, "invalid_request")
    archive = _zip({"a.jpg": png_bytes()})
    job = client.post(
        "/v1/jobs", files={"archive": ("a.zip", archive)}, data={"namespace": namespace}
    )
    assert "A-Z a-z 0-9" in _error(job, 422, "invalid_request")


# --- job paths ------------------------------------------------------------------------------


def test_job_paths_that_used_to_500_are_4xx(client: TestClient, roots: Path) -> None:
    os.symlink(roots / "loop1", roots / "loop2")
    os.symlink(roots / "loop2", roots / "loop1")
    cases = {
        str(roots / "loop1"): "cannot be resolved",
        str(roots / "set" / "a\x00.jpg"): "NUL byte",
        str(roots / ("c" * 300)): "component over 255 bytes",
    }
    for path, message in cases.items():
        assert message in _error(client.post("/v1/jobs", json={"paths": [path]}), 422, "bad_path")
    too_long = client.post("/v1/jobs", json={"paths": ["p" * 5000]})
    assert "at most 4096 characters" in _error(too_long, 422, "invalid_request")


def test_a_loop_or_an_unnameable_file_inside_a_directory_is_skipped(
    client: TestClient, roots: Path, queue: FakeQueue
) -> None:
    os.symlink(roots / "set" / "l2.jpg", roots / "set" / "l1.jpg")
    os.symlink(roots / "set" / "l1.jpg", roots / "set" / "l2.jpg")
    (roots / "set" / "new\nline.jpg").write_bytes(png_bytes(seed=9))
    with open(os.fsencode(roots / "set") + b"/latin1-\xe9.jpg", "wb") as fh:  # not UTF-8
        fh.write(png_bytes(seed=10))
    resp = client.post("/v1/jobs", json={"paths": [str(roots / "set")]})
    assert resp.status_code == 201, resp.text
    skipped = {s["image_id"]: s["reason"] for s in resp.json()["skipped"]}
    assert "cannot be resolved" in skipped["l1.jpg"] and "cannot be resolved" in skipped["l2.jpg"]
    assert "printable" in skipped["new\\nline.jpg"]
    assert "printable" in skipped["latin1-\\udce9.jpg"]
    assert [i.image_id for i in queue.job_items[resp.json()["job_id"]]] == ["a.jpg"]


# --- idempotency ----------------------------------------------------------------------------


def test_same_key_same_request_is_the_first_answer_other_request_409(
    client: TestClient, roots: Path, queue: FakeQueue
) -> None:
    key = {"Idempotency-Key": "nightly-2026-12-03"}
    first = client.post("/v1/jobs", json={"paths": [str(roots / "set")]}, headers=key)
    assert first.status_code == 201
    again = client.post("/v1/jobs", json={"namespace": "default", "paths": [str(roots / "set")]},
                        headers=key)  # fmt: skip
    assert again.status_code == 201 and again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    other = client.post("/v1/jobs", json={"paths": [str(roots / "other")]}, headers=key)
    assert "nightly-2026-12-03" in _error(other, 409, "idempotency_key_reused")
    assert [i.image_id for i in queue.job_items["nightly-2026-12-03"]] == ["a.jpg"]
    bad_key = client.post("/v1/jobs", json={"paths": ["x"]}, headers={"Idempotency-Key": "a b"})
    assert "Idempotency-Key" in _error(bad_key, 422, "invalid_name")


def test_a_reused_key_never_touches_the_running_jobs_files(
    client: TestClient, queue: FakeQueue, tmp_path: Path
) -> None:
    key = {"Idempotency-Key": "upload-1"}
    first_zip = _zip({"a.jpg": png_bytes(seed=1), "b.jpg": png_bytes(seed=2)})
    first = client.post("/v1/jobs", files={"archive": ("a.zip", first_zip)}, headers=key)
    assert first.status_code == 201, first.text
    refs = [Path(i.ref) for i in queue.job_items["upload-1"]]
    before = {p: p.read_bytes() for p in refs}
    other = client.post(
        "/v1/jobs", files={"archive": ("b.zip", _zip({"c.jpg": b"x"}))}, headers=key
    )
    _error(other, 409, "idempotency_key_reused")
    same = client.post("/v1/jobs", files={"archive": ("a.zip", first_zip)}, headers=key)
    assert same.status_code == 201 and same.json() == first.json()
    assert {p: p.read_bytes() for p in refs} == before  # nothing of the job was replaced
    assert [p for p in _uploads(tmp_path) if p.count("/") == 0] == [
        ".incoming",
        refs[0].parent.name,
    ]
    assert not any((tmp_path / "store" / "jobs" / "uploads" / ".incoming").iterdir())


def test_a_refused_upload_leaves_nothing_and_frees_its_key(
    client: TestClient, queue: FakeQueue, tmp_path: Path
) -> None:
    key = {"Idempotency-Key": "retry-me"}
    bad = client.post("/v1/jobs", files={"archive": ("a.zip", b"not an archive" * 50)}, headers=key)
    _error(bad, 422, "bad_archive")
    assert _uploads(tmp_path) == [".incoming"]
    empty = client.post(
        "/v1/jobs", files={"archive": ("a.zip", _zip({"n.txt": b"x"}))}, headers=key
    )
    assert "no image" in _error(empty, 422, "invalid_request")
    assert _uploads(tmp_path) == [".incoming"]
    good = client.post("/v1/jobs", files={"archive": ("a.zip", _zip({"a.jpg": b"x"}))}, headers=key)
    assert good.status_code == 201, good.text


def test_uploads_are_removed_when_their_job_ends(
    client: TestClient, queue: FakeQueue, tmp_path: Path
) -> None:
    ids_ = []
    for n in range(3):
        resp = client.post("/v1/jobs", files={"archive": ("a.zip", _zip({f"{n}.jpg": b"x"}))})
        ids_.append(resp.json()["job_id"])
    done, cancelled, running = ids_
    queue.jobs[done] = JobStatus(**{**queue.jobs[done].__dict__, "state": "done"})
    assert client.get(f"/v1/jobs/{done}").json()["state"] == "done"
    assert client.delete(f"/v1/jobs/{cancelled}").json()["state"] == "cancelled"
    left = [p for p in _uploads(tmp_path) if "/" not in p and p != ".incoming"]
    assert [p.rsplit(".", 1)[0] for p in left] == [running]
    # The timed sweep: an ended job, and an unknown one past the grace period.
    area = client.app.state.uploads  # type: ignore[attr-defined]
    stray = tmp_path / "store" / "jobs" / "uploads" / "ghost.0123"
    stray.mkdir()
    old = time.time() - 3600
    os.utime(stray, (old, old))
    queue.jobs[running] = JobStatus(**{**queue.jobs[running].__dict__, "state": "failed"})
    state = lambda j: None if j not in queue.jobs else queue.jobs[j].state  # noqa: E731
    assert area.sweep(state) == 2
    assert _uploads(tmp_path) == [".incoming"]


def _deflated(size: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.jpg", bytes(size))
    return buf.getvalue()


def test_a_full_upload_budget_answers_507(tmp_path: Path, roots: Path, queue: FakeQueue) -> None:
    with _client(tmp_path, roots, queue, max_pending_upload_bytes=16_000) as client:
        ok = client.post("/v1/jobs", files={"archive": ("a.zip", _deflated(12_000))})
        assert ok.status_code == 201, ok.text  # 12 kB of the 16 kB now pending
        second = _zip({"b.jpg": os.urandom(4_500)})
        full = client.post("/v1/jobs", files={"archive": ("b.zip", second)})
        assert "BUTD_MAX_PENDING_UPLOAD_BYTES" in _error(full, 507, "uploads_full")
        assert int(full.headers["Retry-After"]) >= 1
        job = ok.json()["job_id"]
        queue.jobs[job] = JobStatus(**{**queue.jobs[job].__dict__, "state": "done"})
        again = client.post("/v1/jobs", files={"archive": ("b.zip", second)})  # sweeps, fits
        assert again.status_code == 201, again.text
        bomb = client.post("/v1/jobs", files={"archive": ("z.zip", _deflated(20_000))})
        assert "unpacks to over" in _error(bomb, 507, "uploads_full")
        top = [p for p in _uploads(tmp_path) if "/" not in p]
        assert len(top) == 2 and top[0] == ".incoming"  # and the upload of ``again``


# --- one error body everywhere --------------------------------------------------------------


def test_framework_errors_use_the_one_error_body(client: TestClient) -> None:
    _error(client.get("/v1/nowhere"), 404, "not_found")
    _error(client.put("/v1/jobs"), 405, "method_not_allowed")
    broken = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc'
    resp = client.post("/v1/features", content=broken,
                       headers={"content-type": "multipart/form-data; boundary=xyz"})  # fmt: skip
    assert resp.status_code in (400, 415, 422)
    assert set(resp.json()) >= {"error", "detail"}
    text_job = client.post("/v1/jobs", content=b"paths", headers={"content-type": "text/plain"})
    _error(text_job, 415, "unsupported_media_type")
    _error(client.post("/v1/jobs", content=b"[1, 2]", headers={"content-type": "application/json"}),
           422, "invalid_request")  # fmt: skip
    _error(client.get("/v1/jobs/x/export?format=zip"), 422, "invalid_request")


# --- a corpus of hostile job paths and archives: never a 500 --------------------------------

_PATHS = ["", " ", "..", "/", "~", "~nobody-zz9/x", "\\\\srv\\share", "C:\\x", "/dev/null",
          "/proc/self/environ", "\x00", "%00", "set/../../..", "😀", "a" * 255, "/" * 5000,
          "set/\ud800.jpg", "set\n", "../" * 50 + "etc/passwd"]  # fmt: skip


@pytest.mark.parametrize("path", _PATHS, ids=range(len(_PATHS)))
def test_hostile_job_paths_get_a_4xx_with_the_error_body(client: TestClient, path: str) -> None:
    body = json.dumps({"paths": [path]})  # ensure_ascii: a lone surrogate travels as \ud800
    resp = client.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()) >= {"error", "detail", "request_id"}


def _patched_zip(method: int | None = None, flags: int | None = None) -> bytes:
    """A one-member zip with its compression method or flag bits overwritten in both headers."""
    raw = bytearray(_zip({"a.jpg": png_bytes()}))
    for sig, at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        pos = raw.index(sig)
        if flags is not None:
            raw[pos + at : pos + at + 2] = flags.to_bytes(2, "little")
        if method is not None:
            raw[pos + at + 2 : pos + at + 4] = method.to_bytes(2, "little")
    return bytes(raw)


def _tar(name: str, data: bytes = b"x", mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


_ARCHIVES = {
    "encrypted member": _patched_zip(flags=1),
    "unknown compression": _patched_zip(method=99),
    "truncated zip": _zip({"a.jpg": png_bytes()})[:-30],
    "truncated tar.gz": _tar("a.jpg", os.urandom(4000))[:-200],
    "300-char component": _tar("c" * 300 + "/a.jpg"),
    "control characters only": _tar("new\nline.jpg"),
    "empty zip": _zip({}),
    "gzip of garbage": gzip.compress(os.urandom(500)),
    "empty": b"",
}


@pytest.mark.parametrize("name", list(_ARCHIVES))
def test_hostile_archives_get_a_4xx_with_the_error_body(
    client: TestClient, tmp_path: Path, name: str
) -> None:
    resp = client.post("/v1/jobs", files={"archive": ("a.bin", _ARCHIVES[name])})
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()) >= {"error", "detail", "request_id"}
    assert _uploads(tmp_path) in ([], [".incoming"])  # nothing left behind
