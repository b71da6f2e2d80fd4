"""butd.store.objects and butd.service.url_sources on fsspec's in-memory filesystem (no server).

The S3 path is exercised end to end against a local S3 server in
tests/integration/test_object_store.py; here the URL rules, the listing and the ranged reads
are checked on ``memory://``, which goes through the same fsspec calls.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import numpy as np
import pytest

from bench.store import MV, synthetic
from butd.service.errors import InvalidRequestError, PathNotAllowedError
from butd.service.url_sources import check_allowed, expand_any, expand_urls
from butd.store.image_ids import IdPolicy
from butd.store.objects import BucketShardReaders, BucketShards, is_url, list_files, read_url
from butd.store.shards import ShardMissingError, seal_shard

SUFFIXES = [".jpg", ".png"]


@pytest.fixture
def root() -> Iterator[str]:
    """A fresh ``memory://`` prefix, removed afterwards."""
    fs = fsspec.filesystem("memory")
    prefix = f"/t{uuid.uuid4().hex[:8]}"
    yield f"memory://{prefix}"
    fs.rm(prefix, recursive=True)


def test_is_url() -> None:
    assert is_url("s3://bucket/key") and is_url("gs://b/k") and is_url("file:///data/x.jpg")
    assert not is_url("/data/x.jpg") and not is_url("relative/x.jpg") and not is_url("C:x.jpg")


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("s3://data/coco", True),
        ("S3://data/coco/val/x.jpg", True),
        ("s3://data/cocoa", False),  # a sibling that shares the prefix string
        ("s3://data/coco/../secret", False),
        ("s3://data//coco", False),
        ("s3://other/coco", False),
        ("gs://data/coco", False),
    ],
)
def test_urls_must_lie_under_an_allowed_prefix(url: str, ok: bool) -> None:
    allowed = ["s3://data/coco/"]
    if ok:
        assert check_allowed(url, allowed).startswith("s3://data/coco")
    else:
        with pytest.raises((PathNotAllowedError, InvalidRequestError)):
            check_allowed(url, allowed)


def test_no_allowed_prefix_refuses_every_url() -> None:
    with pytest.raises(PathNotAllowedError, match="BUTD_ALLOWED_URLS is empty"):
        check_allowed("s3://data/x.jpg", [])


def test_listing_gives_ids_relative_to_the_prefix(root: str) -> None:
    fs = fsspec.filesystem("memory")
    for key in ("b/2.jpg", "a/1.PNG", "a/notes.txt", "c.jpg"):
        fs.pipe(f"{root}/set/{key}", key.encode())
    fs.pipe(f"{root}/setx/other.jpg", b"x")  # beside the prefix, not under it
    found, skipped = list_files(f"{root}/set", SUFFIXES)
    assert [i for _, i in found] == ["a/1.PNG", "b/2.jpg", "c.jpg"]
    assert skipped == ["a/notes.txt"]
    assert read_url(found[1][0]) == b"b/2.jpg"
    one, _ = list_files(f"{root}/set/c.jpg", SUFFIXES)
    assert [i for _, i in one] == ["c.jpg"]
    with pytest.raises(FileNotFoundError):
        read_url(f"{root}/set/missing.jpg")


def test_job_expansion_mixes_paths_and_urls(root: str, tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{root}/set/x.jpg", b"1")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "y.jpg").write_bytes(b"2")
    found = expand_any([f"{root}/set", str(tmp_path / "local")], [tmp_path], [root], SUFFIXES)
    assert sorted(i.image_id for i in found.items) == ["x.jpg", "y.jpg"]
    assert {i.ref for i in found.items} == {f"{root}/set/x.jpg", str(tmp_path / "local/y.jpg")}
    with pytest.raises(InvalidRequestError, match="twice"):
        expand_any([f"{root}/set", f"{root}/set"], [], [root], SUFFIXES)
    with pytest.raises(InvalidRequestError, match="cannot list"):
        expand_urls([f"{root}/nothing"], [root], SUFFIXES)


def test_a_get_from_the_bucket_reads_about_one_record(root: str, tmp_path: Path) -> None:
    """Ranged reads: a warm read fetches about one record's bytes, not the shard's."""
    records = synthetic(0, 64, np.random.default_rng(0))
    info = seal_shard(tmp_path, records, model_version=MV, meta={"feature_dim": 2048})
    shard_bytes = (tmp_path / info.name).stat().st_size
    bucket = BucketShards(f"{root}/shards")
    bucket.upload(tmp_path / info.name)
    assert not (tmp_path / info.name).exists() and bucket.names() == [info.name]

    readers = BucketShardReaders(bucket, block_size=64 * 1024, max_blocks=4)
    first = readers.read(info.name, 0)  # opens: metadata + rows
    np.testing.assert_array_equal(first.features, records[0].record.features)
    for row in (40, 17, 63):
        before = readers.bytes_fetched
        rec = readers.read(info.name, row)
        fetched = readers.bytes_fetched - before
        np.testing.assert_array_equal(rec.features, records[row].record.features)
        np.testing.assert_array_equal(rec.boxes, records[row].record.boxes)
        size = rec.features.nbytes + rec.boxes.nbytes
        assert fetched < max(4 * size, 8 * 64 * 1024) < shard_bytes / 2, (row, fetched)
    assert readers.bytes_fetched < shard_bytes
    readers.close()
    with pytest.raises(ShardMissingError):
        readers.read("w-00000000-missing.h5", 0)


def test_object_keys_are_named_by_the_jobs_id_rule(root: str, tmp_path: Path) -> None:
    """``image_ids`` applies to objects as to files: the key relative to the URL is the path."""
    fs = fsspec.filesystem("memory")
    for key in ("val/COCO_val2014_000000000042.jpg", "val/123.jpg", "val/cat.jpg"):
        fs.pipe(f"{root}/coco/{key}", b"x")
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "COCO_val2014_000000000007.jpg").write_bytes(b"y")
    paths = [f"{root}/coco", str(tmp_path / "local")]
    found = expand_any(paths, [tmp_path], [root], SUFFIXES, IdPolicy("coco"))
    assert sorted((i.image_id, i.ref.rsplit("/", 1)[1]) for i in found.items) == [
        ("123", "123.jpg"),
        ("42", "COCO_val2014_000000000042.jpg"),
        ("7", "COCO_val2014_000000000007.jpg"),
    ]
    assert "neither COCO" in found.skipped["val/cat.jpg"]
    stems = expand_urls([f"{root}/coco"], [root], SUFFIXES, IdPolicy("stem"))
    assert sorted(i.image_id for i in stems.items) == ["123", "COCO_val2014_000000000042", "cat"]
