"""Sealed shards: atomic sealing, lazy bounded readers, compaction with live readers."""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pytest

from butd.store.compact import compact, purge_retired
from butd.store.h5 import FeatureFile
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shards import (
    Alias,
    Location,
    Move,
    ShardMissingError,
    ShardReaders,
    ShardWriter,
    clean_temp,
    list_shards,
    scan_shard,
    seal_shard,
)
from tests.unit.test_h5 import MV, VOCAB_A, VOCAB_O, assert_same, keyed, make_records

META = {"config": {"k": 1}, "objects_vocab": VOCAB_O, "attributes_vocab": VOCAB_A}


def sharded(seed: int, n: int = 4) -> list[StoredRow]:
    return keyed(make_records(n, seed=seed))


def test_seal_is_atomic_and_readable(tmp_path: Path) -> None:
    recs = sharded(1)
    info = seal_shard(tmp_path, recs, model_version=MV, meta=META, worker_id="gpu/0")
    assert info.rows == 4 and info.name.startswith("gpu_0-") and info.name.endswith(".h5")
    assert list_shards(tmp_path) == [info.name]
    assert sorted(p.name for p in tmp_path.iterdir()) == [info.name]  # no temp left
    readers = ShardReaders(tmp_path)
    for row, want in enumerate(recs):
        got = readers.read(info.name, row)
        assert_same(got, want.record, fp16=True)
        assert got.extra == {}  # the keys are the shard's columns
    with FeatureFile(tmp_path / info.name) as ff:
        assert ff.content_sha256() == [r.content_sha256 for r in recs]
    other = ShardWriter(tmp_path, worker_id="gpu/0", model_version=MV, meta=META).seal(sharded(2))
    assert other.name != info.name and len(list_shards(tmp_path)) == 2
    readers.close()


def test_seal_refuses_records_without_sha(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no content sha256"):
        seal_shard(tmp_path, [StoredRow(r) for r in make_records(2)], model_version=MV, meta=META)
    assert list(tmp_path.iterdir()) == []


def test_temp_files_are_invisible_and_cleaned(tmp_path: Path) -> None:
    seal_shard(tmp_path, sharded(1), model_version=MV, meta=META)
    stale = tmp_path / ".tmp-w-00000001-dead.h5"
    stale.write_bytes(b"half a shard")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    fresh = tmp_path / ".tmp-w-00000002-beef.h5"
    fresh.write_bytes(b"being written")
    assert len(list_shards(tmp_path)) == 1
    assert clean_temp(tmp_path, older_than_s=600) == 1
    assert not stale.exists() and fresh.exists()


def test_readers_lru_bound_and_missing_shard(tmp_path: Path) -> None:
    infos = [seal_shard(tmp_path, sharded(s), model_version=MV, meta=META) for s in range(4)]
    readers = ShardReaders(tmp_path, max_open=2)
    assert readers.open_count == 0  # lazy: nothing opened before the first read
    for info in infos:
        readers.read(info.name, 0)
        assert readers.open_count <= 2
    assert list(readers._handles) == [infos[2].name, infos[3].name]
    with pytest.raises(ShardMissingError):
        readers.read("nope.h5", 0)
    with pytest.raises(IndexError):
        readers.read(infos[0].name, 99)
    readers.close()
    assert readers.open_count == 0


def _child_read(directory: str, name: str, queue: mp.Queue) -> None:
    readers = CHILD_READERS
    rec = readers.read(name, 1)
    queue.put((rec.image_id, readers._pid == os.getpid(), rec.features.astype(np.float64).sum()))


CHILD_READERS: ShardReaders


def test_forked_child_opens_its_own_handles(tmp_path: Path) -> None:
    global CHILD_READERS
    recs = sharded(3)
    info = seal_shard(tmp_path, recs, model_version=MV, meta=META)
    CHILD_READERS = ShardReaders(tmp_path)
    CHILD_READERS.read(info.name, 0)  # the parent holds a handle before the fork
    ctx = mp.get_context("fork")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_child_read, args=(str(tmp_path), info.name, queue))
    proc.start()
    image_id, own_pid, total = queue.get(timeout=20)
    proc.join(timeout=20)
    assert proc.exitcode == 0
    assert image_id == recs[1].image_id and own_pid
    assert total == recs[1].record.features.astype(np.float16).astype(np.float64).sum()
    CHILD_READERS.close()


def test_scan_shard_lists_contents_and_aliases(tmp_path: Path) -> None:
    recs = sharded(4)
    extra = [Alias("other", "x.jpg", recs[0].content_sha256)]
    info = seal_shard(tmp_path, recs, model_version=MV, meta=META, aliases=extra, sealed_at=7)
    entries = scan_shard(tmp_path, info.name)
    assert entries.model_version == MV and entries.sealed_at == 7
    assert entries.contents == [(r.content_sha256, i) for i, r in enumerate(recs)]
    want = [Alias("ns", r.image_id, r.content_sha256) for r in recs] + extra
    assert entries.aliases == want


def _small_store(tmp_path: Path) -> tuple[list[str], list[StoredRow], StoredRow]:
    """Three small shards; the last repeats the content of record 0 under another id."""
    a, b = sharded(10, 3), sharded(11, 2)
    copy = FeatureRecord(**{**a[0].record.__dict__, "image_id": "copy-of-a0"})
    dup = StoredRow(copy, a[0].content_sha256, "ns")
    names = []
    for i, batch in enumerate([a, b, [dup]]):
        info = seal_shard(tmp_path, batch, model_version=MV, meta=META, sealed_at=i + 1)
        names.append(info.name)
    return names, a + b, dup


def test_compact_merges_dedups_and_keeps_live_readers(tmp_path: Path) -> None:
    names, recs, dup = _small_store(tmp_path)
    big = seal_shard(tmp_path, sharded(12, 6), model_version=MV, meta=META)
    readers = ShardReaders(tmp_path)
    before = [readers.read(names[0], r) for r in range(3)]  # opens the old shard
    moves: list[Move] = []
    result = compact(tmp_path, min_rows=5, relocate=moves.extend)
    assert sorted(result.merged) == sorted(names) and result.duplicates == 1
    (new,) = result.written
    assert new.rows == 5
    assert sorted(list_shards(tmp_path)) == sorted([big.name, new.name])
    assert not (tmp_path / names[0]).exists()
    # The reader that held the old (now unlinked) file keeps reading it.
    for r, want in enumerate(before):
        assert_same(readers.read(names[0], r), want, fp16=True)
    # Every old location moved to a row with the same content.
    assert len(moves) == 6
    for move in moves:
        got = readers.with_file(move.new.shard, lambda ff, row=move.new.row: ff.read_stored(row))
        assert got.content_sha256 == move.content_sha256
        assert move.new.shard == new.name and move.model_version == MV
    new_of = {m.content_sha256: m.new for m in moves}
    for want in recs:  # every original content, same arrays, at its new location
        got = readers.get(new_of[want.content_sha256])
        assert_same(got, want.record, fp16=True)
    dup_move = next(m for m in moves if m.old == Location(names[2], 0))
    assert dup_move.new == next(m.new for m in moves if m.old == Location(names[0], 0))
    # The dropped duplicate's id survives as an alias of the merged shard.
    entries = scan_shard(tmp_path, new.name)
    assert Alias("ns", "copy-of-a0", dup.content_sha256) in entries.aliases
    assert entries.sealed_at == 1
    with pytest.raises(ShardMissingError):
        ShardReaders(tmp_path).read(names[1], 0)
    readers.close()


def test_compact_grace_period_keeps_files_until_purged(tmp_path: Path) -> None:
    names, _, _ = _small_store(tmp_path)
    result = compact(tmp_path, min_rows=100, grace_s=60)
    assert all((tmp_path / n).exists() for n in names)  # still readable by stale lookups
    assert list_shards(tmp_path) == [result.written[0].name]  # but retired
    assert purge_retired(tmp_path, grace_s=60) == 0
    assert purge_retired(tmp_path, grace_s=0) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == [result.written[0].name]


def test_compact_leaves_big_shards_and_other_versions(tmp_path: Path) -> None:
    seal_shard(tmp_path, sharded(1, 2), model_version=MV, meta=META)
    other = keyed(make_records(2, seed=2, model_version="mv-other"))
    seal_shard(tmp_path, other, model_version="mv-other", meta=META)
    big = seal_shard(tmp_path, sharded(3, 8), model_version=MV, meta=META)
    before = sorted(list_shards(tmp_path))
    result = compact(tmp_path, min_rows=5)
    assert result.merged == [] and sorted(list_shards(tmp_path)) == before
    assert big.name in before


def test_alias_only_shard_is_scanned_and_merged(tmp_path: Path) -> None:
    recs = sharded(20, 3)
    sha = recs[0].content_sha256
    only = seal_shard(tmp_path, [], model_version=MV, meta=META, aliases=[Alias("u", "7", sha)])
    assert scan_shard(tmp_path, only.name).aliases == [Alias("u", "7", sha)]
    seal_shard(tmp_path, recs, model_version=MV, meta=META)
    result = compact(tmp_path, min_rows=10)
    (new,) = result.written
    entries = scan_shard(tmp_path, new.name)
    assert Alias("u", "7", sha) in entries.aliases and len(entries.contents) == 3


def test_small_shard_stays_small(tmp_path: Path) -> None:
    recs = keyed(make_records(2, dim=2048, min_boxes=10, max_boxes=10))
    info = seal_shard(tmp_path, recs, model_version=MV, meta=META)
    size = (tmp_path / info.name).stat().st_size
    payload = 20 * 2048 * 2  # 20 fp16 feature rows
    assert size < payload + 64 * 1024, size  # chunks capped at the data: little overhead
