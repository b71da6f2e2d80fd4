"""Batch forming, per-image loading and the Processor, with a fake model and store."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from butd.detector.config import ExtractionConfig
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shards import Alias
from butd.workers.batcher import (
    Processor,
    Task,
    fill_batch,
    load_task,
    tasks_from_online,
    tasks_from_shard,
)
from butd.workers.options import ExtractOptions
from butd.workers.outcomes import Cached, Extracted, Failed
from butd.workers.protocol import JobItem, JobShard, OnlineRequest
from butd.workers.queue import Entry
from butd.workers.sealer import Sealer
from butd.workers.sources import LocalFile, Uploaded, read_source, ref_source


def png_bytes(w: int = 32, h: int = 24, value: int = 0) -> bytes:
    arr = np.full((h, w, 3), value, dtype=np.uint8)
    arr[: h // 2, :, 0] = 255 - value
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


class FakeExtractor:
    """Same interface as butd.detector.extractor.Extractor; records every call."""

    def __init__(self, fail_ids: Sequence[str] = ()) -> None:
        self.config = ExtractionConfig()
        self.fail_ids = set(fail_ids)
        self.calls: list[list[str]] = []

    def version_for(self, config: ExtractionConfig) -> str:
        return f"v{config.min_boxes}-{config.max_boxes}"

    def extract(
        self,
        images: Sequence[np.ndarray],
        image_ids: Sequence[str],
        config: ExtractionConfig | None = None,
    ) -> list[FeatureRecord]:
        config = config or self.config
        self.calls.append(list(image_ids))
        if self.fail_ids & set(image_ids):
            raise RuntimeError("model broke on " + ",".join(sorted(self.fail_ids & set(image_ids))))
        return [
            record(i, im, self.version_for(config)) for i, im in zip(image_ids, images, strict=True)
        ]


def record(image_id: str, image: np.ndarray, version: str, n: int = 2) -> FeatureRecord:
    h, w = image.shape[:2]
    return FeatureRecord(
        image_id=image_id,
        image_w=w,
        image_h=h,
        boxes=np.tile(np.array([[0, 0, w, h]], np.float32), (n, 1)),
        features=np.zeros((n, 4), np.float32),
        objects_id=np.zeros(n, np.int64),
        objects_conf=np.ones(n, np.float32),
        attrs_id=np.zeros(n, np.int64),
        attrs_conf=np.ones(n, np.float32),
        model_version=version,
    )


class FakeSink:
    def __init__(self) -> None:
        self.stored: dict[tuple[str, str], FeatureRecord] = {}
        self.seals: list[tuple[str, list[str]]] = []
        self.aliases: list[Alias] = []

    def has(self, model_version: str, sha256: str) -> bool:
        return (model_version, sha256) in self.stored

    def put(
        self,
        name: str,
        records: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        assert config["max_boxes"] >= config["min_boxes"]
        if records:
            self.seals.append((name, [r.content_sha256 for r in records]))
        for r in records:
            assert r.record.model_version == model_version
            self.stored[(model_version, r.content_sha256)] = r.record
        self.aliases.extend(aliases)


def task(tmp_path: Path, name: str, data: bytes, options: ExtractOptions | None = None) -> Task:
    path = tmp_path / name
    path.write_bytes(data)
    entry = Entry("butd:jobs", "1-0", {})
    return Task(entry, name, "ns", options or ExtractOptions(), LocalFile(path))


# --- fill_batch ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def entries(n: int, start: int = 0) -> list[Entry]:
    return [Entry("s", f"{i}-0", {}) for i in range(start, start + n)]


def test_fill_batch_stops_at_max_items() -> None:
    calls: list[tuple[int, int]] = []

    def read(count: int, block_ms: int) -> list[Entry]:
        calls.append((count, block_ms))
        return entries(5, 100)  # more than asked: the batch must still be capped

    batch = fill_batch(entries(1), read, max_items=4, max_wait_ms=50, clock=FakeClock())
    assert [e.entry_id for e in batch] == ["0-0", "100-0", "101-0", "102-0"]
    assert calls == [(3, 0)]  # the queued entries filled it: no wait at all


def test_fill_batch_stops_at_the_deadline() -> None:
    clock = FakeClock()
    seen_blocks: list[int] = []

    def read(count: int, block_ms: int) -> list[Entry]:
        seen_blocks.append(block_ms)
        clock.t += 0.004  # each read takes 4 ms and yields one entry
        return entries(1, len(seen_blocks))

    batch = fill_batch(entries(1), read, max_items=100, max_wait_ms=10, clock=clock)
    # a burst: the non-blocking read found one, so it waits, never past first arrival + 10 ms
    assert seen_blocks == [0, 6, 2]
    assert len(batch) == 4


def test_fill_batch_sends_a_lone_request_at_once() -> None:
    reads = []

    def read(count: int, block_ms: int) -> list[Entry]:
        reads.append(block_ms)
        return []

    assert len(fill_batch(entries(2), read, max_items=8, max_wait_ms=20, clock=FakeClock())) == 2
    assert reads == [0]  # nothing queued: no BATCH_WAIT_MS added to its latency


def test_fill_batch_returns_when_a_blocking_read_times_out() -> None:
    reads = []

    def read(count: int, block_ms: int) -> list[Entry]:
        reads.append(block_ms)
        return entries(1, 100) if block_ms == 0 else []

    batch = fill_batch(entries(1), read, max_items=8, max_wait_ms=20, clock=FakeClock())
    assert len(batch) == 2 and reads == [0, 20]


def test_fill_batch_with_zero_wait_only_takes_what_is_queued() -> None:
    reads = []

    def read(count: int, block_ms: int) -> list[Entry]:
        reads.append(block_ms)
        return entries(2, 100)

    assert len(fill_batch(entries(1), read, max_items=8, max_wait_ms=0)) == 3
    assert reads == [0]


# --- tasks and loading --------------------------------------------------------------------


def test_online_entry_becomes_a_task() -> None:
    req = OnlineRequest("r1", "ab" * 32, "coco", "42", ExtractOptions(max_boxes=36), 123, "k1")
    t = tasks_from_online(Entry("butd:online", "5-0", req.to_fields()))
    assert (t.request_id, t.image_id, t.namespace, t.source) == ("r1", "42", "coco", Uploaded("k1"))
    assert t.options == ExtractOptions(max_boxes=36)
    assert t.expired(124) and not t.expired(123)


def test_shard_entry_becomes_one_task_per_item() -> None:
    shard = JobShard("j", 3, (JobItem("/a.jpg", "a"), JobItem("/b.jpg", "b")), namespace="x")
    parsed, tasks = tasks_from_shard(Entry("butd:jobs", "7-0", shard.to_fields()))
    assert parsed == shard
    assert [(t.image_id, t.source, t.namespace) for t in tasks] == [
        ("a", LocalFile(Path("/a.jpg")), "x"),
        ("b", LocalFile(Path("/b.jpg")), "x"),
    ]


def test_load_task_reports_each_failure_with_a_reason(tmp_path: Path) -> None:
    good = load_task(task(tmp_path, "good.png", png_bytes()), lambda k: None, max_pixels=10**6)
    assert good.ok and good.image is not None and good.image.shape == (24, 32, 3)
    assert good.content_sha256 == hashlib.sha256(png_bytes()).hexdigest()

    bad = load_task(task(tmp_path, "bad.jpg", b"not an image"), lambda k: None, max_pixels=10**6)
    assert not bad.ok and "NotAnImageError" in bad.reason

    cut = load_task(task(tmp_path, "cut.png", png_bytes()[:60]), lambda k: None, max_pixels=10**6)
    assert not cut.ok and cut.reason

    big = load_task(task(tmp_path, "big.png", png_bytes()), lambda k: None, max_pixels=100)
    assert not big.ok and "TooManyPixels" in big.reason

    gone = Task(
        Entry("s", "1-0", {}), "x", "", ExtractOptions(), LocalFile(tmp_path / "missing.png")
    )
    missing = load_task(gone, lambda k: None, max_pixels=10**6)
    assert not missing.ok and "missing.png" in missing.reason


def test_load_task_checks_the_gateway_hash() -> None:
    t = Task(
        Entry("s", "1-0", {}), "x", "", ExtractOptions(), Uploaded("k"), content_sha256="0" * 64
    )
    loaded = load_task(t, lambda k: png_bytes(), max_pixels=10**6)
    assert not loaded.ok and "differs" in loaded.reason
    expired = load_task(t, lambda k: None, max_pixels=10**6)
    assert "gone" in expired.reason


def test_read_source_reads_archive_members(tmp_path: Path) -> None:
    zpath = tmp_path / "a.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        zf.writestr("dir/x.png", b"zipped")
    tpath = tmp_path / "a.tar"
    with tarfile.open(tpath, "w") as tf:
        info = tarfile.TarInfo("y.png")
        info.size = 6
        tf.addfile(info, io.BytesIO(b"tarred"))
    assert read_source(ref_source(f"{zpath}::dir/x.png"), lambda k: None) == b"zipped"
    assert read_source(ref_source(f"{tpath}::y.png"), lambda k: None) == b"tarred"
    with pytest.raises(KeyError):
        read_source(ref_source(f"{zpath}::nope.png"), lambda k: None)
    with pytest.raises(ValueError, match="absolute"):
        read_source(ref_source("relative/x.png"), lambda k: None)


# --- Processor ----------------------------------------------------------------------------


def test_a_bad_image_fails_only_itself(tmp_path: Path) -> None:
    ext, sink = FakeExtractor(), FakeSink()
    tasks = [
        task(tmp_path, "a.png", png_bytes(value=1)),
        task(tmp_path, "bad.png", b"\x89PNG garbage"),
        task(tmp_path, "c.png", png_bytes(value=3)),
    ]
    out = Processor(ext, sink, lambda k: None, max_pixels=10**6).run(tasks, "n")
    assert [type(o) for o in out] == [Extracted, Failed, Extracted]
    assert isinstance(out[1], Failed) and "NotAnImageError" in out[1].reason
    assert len(ext.calls) == 1 and len(ext.calls[0]) == 2
    assert len(sink.stored) == 2 and len(sink.seals) == 1
    assert [a.image_id for a in sink.aliases] == ["a.png", "c.png"]


def test_stored_content_is_not_recomputed_and_duplicates_run_once(tmp_path: Path) -> None:
    ext, sink = FakeExtractor(), FakeSink()
    proc = Processor(ext, sink, lambda k: None, max_pixels=10**6)
    same = png_bytes(value=7)
    first = proc.run([task(tmp_path, "a.png", same), task(tmp_path, "b.png", same)], "n1")
    assert all(isinstance(o, Extracted) and o.record.num_boxes == 2 for o in first)
    assert [o.record.image_id for o in first if isinstance(o, Extracted)] == ["a.png", "b.png"]
    assert len(ext.calls[0]) == 1  # same bytes, computed once
    again = proc.run([task(tmp_path, "c.png", same)], "n2")
    assert isinstance(again[0], Cached)
    assert len(ext.calls) == 1 and len(sink.seals) == 1
    assert sorted(a.image_id for a in sink.aliases) == ["a.png", "b.png", "c.png"]


def test_batch_is_split_by_options(tmp_path: Path) -> None:
    ext, sink = FakeExtractor(), FakeSink()
    proc = Processor(ext, sink, lambda k: None, max_pixels=10**6)
    tasks = [
        task(tmp_path, "a.png", png_bytes(value=1)),
        task(tmp_path, "b.png", png_bytes(value=2), ExtractOptions(min_boxes=36, max_boxes=36)),
        task(tmp_path, "c.png", png_bytes(value=3)),
    ]
    out = proc.run(tasks, "n")
    assert [o.model_version for o in out] == ["v10-100", "v36-36", "v10-100"]
    assert sorted(len(c) for c in ext.calls) == [1, 2]
    assert len(sink.seals) == 2


def test_inconsistent_options_fail_their_items(tmp_path: Path) -> None:
    proc = Processor(FakeExtractor(), FakeSink(), lambda k: None, max_pixels=10**6)
    out = proc.run([task(tmp_path, "a.png", png_bytes(), ExtractOptions(min_boxes=200))], "n")
    assert isinstance(out[0], Failed) and "min_boxes" in out[0].reason


def test_an_image_that_breaks_the_model_is_isolated(tmp_path: Path) -> None:
    good, bad = png_bytes(value=1), png_bytes(value=9)
    ext, sink = FakeExtractor(fail_ids=["b.png"]), FakeSink()
    out = Processor(ext, sink, lambda k: None, max_pixels=10**6).run(
        [task(tmp_path, "g.png", good), task(tmp_path, "b.png", bad)], "n"
    )
    assert isinstance(out[0], Extracted) and isinstance(out[1], Failed)
    assert out[1].reason == "extraction failed: RuntimeError: model broke on b.png"
    assert len(sink.stored) == 1


# --- the sealer thread --------------------------------------------------------------------


def stored_row(sha: str) -> StoredRow:
    return StoredRow(record(sha, np.zeros((4, 4, 3), np.uint8), "v"), sha, "ns")


def test_sealer_group_commits_the_batches_waiting_then_acks_them_once() -> None:
    sink, acked = FakeSink(), []
    sealer = Sealer(sink, acked.append, linger_s=0.3)
    config = {"min_boxes": 1, "max_boxes": 2}
    try:
        for k in range(3):  # three answered batches within the linger
            sealer.put(f"b{k}", [stored_row(f"s{k}")], "v", config, [Alias("ns", f"s{k}", f"s{k}")])
            sealer.submit([f"entry{k}"])
        assert sealer.has("v", "s1") and not sink.has("v", "s1")  # computed, not yet sealed
        assert acked == []  # never acked before the seal
        assert sealer.drain(10)
    finally:
        sealer.close()
    assert sink.seals == [("b0+2", ["s0", "s1", "s2"])]  # one shard for the three
    assert acked == [["entry0", "entry1", "entry2"]]  # one ack for the three, after it
    assert sink.aliases == [Alias("ns", f"s{k}", f"s{k}") for k in range(3)]
    assert not sealer.has("v", "s9") and sealer.has("v", "s1")  # now from the sink


def test_a_failed_seal_acks_nothing_and_the_sealer_carries_on() -> None:
    sink, acked = FakeSink(), []
    sealer = Sealer(sink, acked.append)
    config = {"min_boxes": 1, "max_boxes": 2}
    try:
        sealer.put("bad", [stored_row("x")], "v", {"min_boxes": 3, "max_boxes": 2})
        sealer.submit(["lost"])  # the fake sink refuses this config: the seal raises
        assert sealer.drain(10)
        assert acked == [] and not sealer.has("v", "x")  # stays pending, for redelivery
        sealer.put("good", [stored_row("y")], "v", config)
        sealer.submit(["kept"])
        assert sealer.drain(10)
    finally:
        sealer.close()
    assert acked == [["kept"]] and sink.seals == [("good", ["y"])]
