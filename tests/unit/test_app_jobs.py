"""Batch-job routes and their path / archive safety rules (fake queue, real files)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from butd.service import datasets
from butd.service.app import create_app
from butd.service.errors import PathNotAllowedError
from butd.service.settings import Settings
from tests.unit.app_fakes import FakeQueue, FakeStore, png_bytes


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "set" / "sub").mkdir(parents=True)
    (data / "set" / "a.jpg").write_bytes(png_bytes(seed=1))
    (data / "set" / "sub" / "b.png").write_bytes(png_bytes(seed=2))
    (data / "set" / "notes.txt").write_text("not an image")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "c.jpg").write_bytes(png_bytes(seed=3))
    return data


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue(FakeStore())


@pytest.fixture
def client(tmp_path: Path, roots: Path, queue: FakeQueue) -> Iterator[TestClient]:
    settings = Settings(
        store_dir=tmp_path / "store",
        redis_url="redis://unused",
        allowed_roots=[roots],
        job_shard_size=1,
    )
    with TestClient(create_app(settings, queue=queue, store=queue.store)) as c:
        yield c


def test_directory_job_expands_to_sorted_images(
    client: TestClient, roots: Path, queue: FakeQueue
) -> None:
    resp = client.post("/v1/jobs", json={"paths": [str(roots / "set")], "namespace": "ds"})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["total"] == 2 and body["shards"] == 2
    assert body["skipped"] == [
        {"image_id": "notes.txt", "reason": "suffix '.txt' is not an image suffix"}
    ]
    items = queue.job_items[body["job_id"]]
    assert [i.image_id for i in items] == ["a.jpg", "sub/b.png"]
    assert items[0].ref == str((roots / "set" / "a.jpg").resolve())
    status = client.get(f"/v1/jobs/{body['job_id']}").json()
    assert status["state"] == "queued" and status["total"] == 2 and status["namespace"] == "ds"


def test_relative_paths_are_under_the_first_root(client: TestClient, queue: FakeQueue) -> None:
    resp = client.post("/v1/jobs", json={"paths": ["set/a.jpg"]})
    assert resp.status_code == 201
    assert [i.image_id for i in queue.job_items[resp.json()["job_id"]]] == ["a.jpg"]


def test_dotdot_escape_is_403(client: TestClient, roots: Path) -> None:
    resp = client.post("/v1/jobs", json={"paths": [str(roots / ".." / "secret")]})
    assert resp.status_code == 403
    assert "outside the allowed roots" in resp.json()["detail"]
    resp = client.post("/v1/jobs", json={"paths": ["../secret/c.jpg"]})
    assert resp.status_code == 403


def test_symlink_escape_is_403(client: TestClient, roots: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "secret", roots / "link")
    resp = client.post("/v1/jobs", json={"paths": [str(roots / "link")]})
    assert resp.status_code == 403
    os.symlink(tmp_path / "secret" / "c.jpg", roots / "set" / "evil.jpg")
    resp = client.post("/v1/jobs", json={"paths": [str(roots / "set")]})
    assert resp.status_code == 403 and "evil.jpg" in resp.json()["detail"]


def test_missing_path_and_empty_job_are_422(client: TestClient, roots: Path) -> None:
    assert client.post("/v1/jobs", json={"paths": [str(roots / "nope")]}).status_code == 422
    assert client.post("/v1/jobs", json={"paths": []}).status_code == 422
    (roots / "empty").mkdir()
    assert client.post("/v1/jobs", json={"paths": [str(roots / "empty")]}).status_code == 422


def test_no_roots_refuses_server_paths(tmp_path: Path) -> None:
    with pytest.raises(PathNotAllowedError, match="BUTD_ALLOWED_ROOTS"):
        datasets.resolve_allowed(str(tmp_path), [])


def test_idempotency_key_names_the_job(client: TestClient, roots: Path) -> None:
    body = {"paths": [str(roots / "set")]}
    first = client.post("/v1/jobs", json=body, headers={"idempotency-key": "job-7"})
    second = client.post("/v1/jobs", json=body, headers={"idempotency-key": "job-7"})
    assert first.json()["job_id"] == second.json()["job_id"] == "job-7"


def test_cancel_and_unknown_job(client: TestClient, roots: Path) -> None:
    job = client.post("/v1/jobs", json={"paths": [str(roots / "set")]}).json()["job_id"]
    resp = client.delete(f"/v1/jobs/{job}")
    assert resp.status_code == 200 and resp.json()["state"] == "cancelled"
    assert client.get("/v1/jobs/unknown").status_code == 404
    assert client.delete("/v1/jobs/unknown").status_code == 404
    assert client.get("/v1/jobs/..%2Fx").status_code == 404


def test_export_streams_the_store_export(client: TestClient, roots: Path, queue: FakeQueue) -> None:
    job = client.post("/v1/jobs", json={"paths": [str(roots / "set")], "namespace": "ds"})
    job_id = job.json()["job_id"]
    resp = client.get(f"/v1/jobs/{job_id}/export?format=lxmert-tsv")
    assert resp.status_code == 200 and resp.headers["x-records"] == "2"
    assert resp.content == b"a.jpg\nsub/b.png"
    version, namespace, ids, fmt, out = queue.store.exports[0]
    assert version == "mv0000000000test"
    assert (namespace, ids, fmt) == ("ds", ["a.jpg", "sub/b.png"], "lxmert-tsv")
    assert queue.store.export_options == {"ids": "consumer"}  # ids as the consumer keys them
    assert not out.exists()  # temp file removed after streaming
    assert client.get(f"/v1/jobs/{job_id}/export?format=csv").status_code == 422
    assert client.get("/v1/jobs/nope/export").status_code == 404


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(members: dict[str, bytes], link: tuple[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            tf.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("pack", [_zip, _tar])
def test_archive_upload_is_unpacked_into_the_store(
    client: TestClient, queue: FakeQueue, tmp_path: Path, pack: object
) -> None:
    archive = pack({"imgs/x.jpg": png_bytes(seed=5), "y.png": png_bytes(seed=6)})  # type: ignore[operator]
    resp = client.post("/v1/jobs", files={"archive": ("d.bin", archive)}, data={"namespace": "up"})
    assert resp.status_code == 201, resp.text
    items = queue.job_items[resp.json()["job_id"]]
    assert [i.image_id for i in items] == ["imgs/x.jpg", "y.png"]
    uploads = (tmp_path / "store" / "jobs" / "uploads").resolve()
    assert all(Path(i.ref).is_relative_to(uploads) for i in items)
    assert Path(items[0].ref).read_bytes() == png_bytes(seed=5)


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (_zip({"../evil.jpg": b"x"}), "'..'"),
        (_zip({"/abs.jpg": b"x"}), "absolute"),
        (_tar({"a/../../evil.jpg": b"x"}), "'..'"),
        (_tar({"ok.jpg": b"x"}, link=("l.jpg", "/etc/passwd")), "link"),
        (b"neither zip nor tar" * 10, "neither"),
    ],
)
def test_unsafe_archives_are_refused(
    client: TestClient, tmp_path: Path, archive: bytes, message: str
) -> None:
    resp = client.post("/v1/jobs", files={"archive": ("d.bin", archive)})
    assert resp.status_code == 422 and message in resp.json()["detail"]
    assert not (tmp_path / "evil.jpg").exists()
    assert not any((tmp_path / "store" / "jobs" / "uploads").glob("*/*"))


def test_archive_limits(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip({f"{i}.jpg": b"0123456789" for i in range(5)}))
    few = datasets.ArchiveLimits(max_members=3, max_unpacked_bytes=10**6)
    with pytest.raises(datasets.ArchiveError, match="over 3 files"):
        datasets.unpack(archive, tmp_path / "out1", few)
    small = datasets.ArchiveLimits(max_members=100, max_unpacked_bytes=25)
    with pytest.raises(datasets.ArchiveError, match="over 25 bytes"):
        datasets.unpack(archive, tmp_path / "out2", small)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
