"""The image source of a task: parsed once from the wire fields into a typed value, read by kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from butd.workers.batcher import tasks_from_online, tasks_from_shard
from butd.workers.options import ExtractOptions
from butd.workers.protocol import JobItem, JobShard, OnlineRequest
from butd.workers.queue import Entry
from butd.workers.sources import (
    ArchiveMember,
    LocalFile,
    ObjectUrl,
    Uploaded,
    online_source,
    read_source,
    ref_source,
)


@pytest.mark.parametrize(
    ("ref", "source"),
    [
        ("/data/a.jpg", LocalFile(Path("/data/a.jpg"))),
        ("/data/x.zip::dir/b.png", ArchiveMember(Path("/data/x.zip"), "dir/b.png")),
        ("/data/x.tar.gz::c::d.png", ArchiveMember(Path("/data/x.tar.gz"), "c::d.png")),
        ("s3://bucket/key.jpg", ObjectUrl("s3://bucket/key.jpg")),
        ("relative.png", LocalFile(Path("relative.png"))),  # refused when read, item by item
    ],
)
def test_a_ref_parses_to_its_kind_and_prints_as_the_wire_had_it(ref: str, source: object) -> None:
    assert ref_source(ref) == source
    assert str(source) == ref


def test_an_online_entry_names_uploaded_bytes_or_a_path() -> None:
    assert online_source("butd:image:r1", "") == Uploaded("butd:image:r1")
    assert online_source("butd:image:r1", "/ignored.png") == Uploaded("butd:image:r1")
    assert online_source("", "/shared/a.png") == LocalFile(Path("/shared/a.png"))
    assert str(Uploaded("butd:image:r1")) == "redis:butd:image:r1"  # how reasons name it


def test_the_source_round_trips_from_the_wire_fields() -> None:
    """The wire keeps its string fields; the worker's task holds the typed value."""
    for req, expected in [
        (OnlineRequest("r1", "", "ns", "a", image_key="butd:image:r1"), Uploaded("butd:image:r1")),
        (OnlineRequest("r2", "", "ns", "b", path="/s/b.png"), LocalFile(Path("/s/b.png"))),
    ]:
        fields = req.to_fields()
        assert (fields["image_key"], fields["path"]) == (req.image_key, req.path)
        assert tasks_from_online(Entry("butd:online", "1-0", fields)).source == expected
    shard = JobShard("j", 0, (JobItem("/d/x.zip::m.png", "m"), JobItem("s3://b/k", "k")))
    _, tasks = tasks_from_shard(Entry("butd:jobs", "2-0", shard.to_fields()))
    assert [t.source for t in tasks] == [
        ArchiveMember(Path("/d/x.zip"), "m.png"),
        ObjectUrl("s3://b/k"),
    ]
    assert [str(t.source) for t in tasks] == [i.ref for i in shard.items]
    assert tasks[0].options == ExtractOptions()


def test_reading_dispatches_on_the_kind(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"file")
    asked: list[str] = []

    def fetch(key: str) -> bytes | None:
        asked.append(key)
        return b"uploaded" if key == "k" else None

    assert read_source(LocalFile(tmp_path / "a.png"), fetch) == b"file"
    assert read_source(Uploaded("k"), fetch) == b"uploaded"
    with pytest.raises(FileNotFoundError, match="'gone' are gone"):
        read_source(Uploaded("gone"), fetch)
    assert asked == ["k", "gone"]
    with pytest.raises(ValueError, match=r"must be absolute; got 'a\.png'"):
        read_source(LocalFile(Path("a.png")), fetch)
