"""The Redis feature index against a private redis-server: lookups, rebuilds, compaction."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis

from butd.store.compact import compact
from butd.store.index import FeatureIndex, reindex
from butd.store.records import FeatureRecord
from butd.store.shards import (
    Alias,
    Location,
    ShardInfo,
    ShardMissingError,
    ShardReaders,
    list_shards,
    seal_shard,
)
from tests.redis_proc import RedisProcess
from tests.unit.test_h5 import MV, VOCAB_A, VOCAB_O, keyed, make_records, sha_of

META = {"config": {}, "objects_vocab": VOCAB_O, "attributes_vocab": VOCAB_A}


def store_batch(index: FeatureIndex, directory: Path, recs: list[FeatureRecord]) -> ShardInfo:
    """What a worker does: seal a shard, then index each row and its alias."""
    info = seal_shard(directory, keyed(recs), model_version=recs[0].model_version, meta=META)
    for row, rec in enumerate(recs):
        index.put(rec.model_version, sha_of(rec), Location(info.name, row), [("ns", rec.image_id)])
    return info


def answers(index: FeatureIndex, recs: list[FeatureRecord]) -> dict[str, object]:
    out: dict[str, object] = {}
    for rec in recs:
        sha = sha_of(rec)
        out[f"c:{rec.model_version}:{sha}"] = index.lookup_content(rec.model_version, sha)
        out[f"a:{rec.image_id}"] = index.lookup_alias("ns", rec.image_id)
    return out


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


def test_put_lookup_first_wins(client: redis.Redis) -> None:
    index = FeatureIndex(client)
    loc = Location("w-00000001-abc.h5", 3)
    assert index.lookup_content(MV, "s1") is None and index.lookup_alias("ns", "a") is None
    assert index.put(MV, "s1", loc, [("ns", "a.jpg"), ("coco", "42")]) == loc
    assert index.lookup_content(MV, "s1") == loc
    assert index.lookup_content("other-version", "s1") is None
    assert index.lookup_alias("ns", "a.jpg") == "s1" and index.lookup_alias("coco", "42") == "s1"
    assert index.lookup(MV, "coco", "42") == loc
    # A second writer of the same content (redelivery, duplicate upload) does not move it.
    assert index.put(MV, "s1", Location("w-00000002-def.h5", 0), [("ns", "a.jpg")]) == loc
    assert index.lookup_content(MV, "s1") == loc
    # An alias keeps its first content.
    assert index.put_alias("ns", "a.jpg", "s2") == "s1"
    assert index.stats() == {"contents": {MV: 1}, "aliases": {"ns": 1, "coco": 1}}


def test_reindex_after_flushall_gives_same_answers(client: redis.Redis, tmp_path: Path) -> None:
    index = FeatureIndex(client)
    recs = [r for seed in range(4) for r in make_records(5, seed=seed)]
    other = make_records(3, seed=9, model_version="mv-2", prefix="v2")
    for start in range(0, len(recs), 5):
        store_batch(index, tmp_path, recs[start : start + 5])
    store_batch(index, tmp_path, other)
    store_batch(index, tmp_path, recs[:2])  # a duplicate shard: the index keeps the first
    sha0 = sha_of(recs[0])
    seal_shard(
        tmp_path, keyed(recs[3:4]), model_version=MV, meta=META, aliases=[Alias("x", "y", sha0)]
    )
    index.put_alias("x", "y", sha0)
    before = answers(index, recs + other)
    before["xy"] = index.lookup_alias("x", "y")
    stats = index.stats()
    client.flushall()
    assert index.lookup_content(MV, sha0) is None
    client.set("butd:store:loc:stale", "1")  # a key no shard supports disappears
    result = reindex(tmp_path, client)
    assert result.shards == 7 and result.contents == 23
    after = answers(index, recs + other)
    after["xy"] = index.lookup_alias("x", "y")
    assert after == before
    assert index.stats() == stats
    assert client.exists("butd:store:loc:stale") == 0
    assert not [k for k in client.scan_iter("*rebuild*")]


def test_redelivery_is_idempotent_and_compact_drops_duplicate(
    client: redis.Redis, tmp_path: Path
) -> None:
    index = FeatureIndex(client)
    recs = make_records(4, seed=1)
    first = store_batch(index, tmp_path, recs)
    want = answers(index, recs)
    store_batch(index, tmp_path, recs)  # the same message delivered again
    assert answers(index, recs) == want
    assert index.stats()["contents"] == {MV: 4}
    result = compact(tmp_path, min_rows=100, relocate=index.relocate)
    assert result.duplicates == 4 and len(list_shards(tmp_path)) == 1
    (new,) = result.written
    readers = ShardReaders(tmp_path)
    for rec in recs:
        loc = index.lookup(MV, "ns", rec.image_id)
        assert loc is not None and loc.shard == new.name != first.name
        got = readers.get(loc)
        np.testing.assert_array_equal(got.features, rec.features.astype(np.float16))
    readers.close()
    assert answers(index, recs) != want  # moved ...
    after = answers(index, recs)
    client.flushall()
    reindex(tmp_path, client)
    assert answers(index, recs) == after  # ... and the files alone say the same


def _wait_for(cond: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_compact_while_a_reader_reads(client: redis.Redis, tmp_path: Path) -> None:
    index = FeatureIndex(client)
    recs = [r for seed in range(6) for r in make_records(4, seed=seed)]
    for start in range(0, len(recs), 4):
        store_batch(index, tmp_path, recs[start : start + 4])
    want = {r.image_id: r.features.astype(np.float16) for r in recs}
    errors: list[str] = []
    reads = [0]
    stop = threading.Event()

    def reader() -> None:
        readers = ShardReaders(tmp_path, max_open=2)
        while not stop.is_set():
            for rec in recs:
                for _ in range(3):  # a compacted shard: look the id up again
                    try:
                        got = readers.get(index.lookup(MV, "ns", rec.image_id))
                        break
                    except ShardMissingError:
                        continue
                else:
                    errors.append(f"{rec.image_id}: shard vanished three times")
                    continue
                if not np.array_equal(got.features, want[rec.image_id]):
                    errors.append(f"{rec.image_id}: features differ")
                reads[0] += 1
        readers.close()

    thread = threading.Thread(target=reader)
    thread.start()
    _wait_for(lambda: reads[0] >= len(recs))  # the reader holds handles on the old shards
    result = compact(tmp_path, min_rows=10, max_rows=12, relocate=index.relocate)
    done = reads[0]
    _wait_for(lambda: reads[0] >= done + len(recs))  # and a full pass after the compaction
    stop.set()
    thread.join(timeout=30)
    assert not errors and reads[0] > 0
    assert len(result.merged) == 6 and len(result.written) == 2
    assert set(list_shards(tmp_path)) == {info.name for info in result.written}
    readers = ShardReaders(tmp_path)
    for rec in recs:
        got = readers.get(index.lookup(MV, "ns", rec.image_id))
        np.testing.assert_array_equal(got.features, want[rec.image_id])
    readers.close()


def test_index_survives_redis_restart_with_aof(redis_proc: RedisProcess) -> None:
    index = FeatureIndex.from_url(redis_proc.url)
    index.put(MV, "s1", Location("a.h5", 1), [("ns", "one")])
    index.client.close()
    redis_proc.restart()
    index = FeatureIndex.from_url(redis_proc.url)
    assert index.lookup(MV, "ns", "one") == Location("a.h5", 1)
    index.client.close()


def test_cli_store_reindex_compact_stats(
    redis_url: str, client: redis.Redis, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import json

    from butd.cli import store as store_cli

    recs = [r for seed in range(3) for r in make_records(3, seed=seed)]
    for start in range(0, len(recs), 3):
        seal_shard(tmp_path, keyed(recs[start : start + 3]), model_version=MV, meta=META)
    parser = argparse.ArgumentParser()
    store_cli.register(parser.add_subparsers())

    def run(*argv: str) -> dict:
        args = parser.parse_args(["store", *argv, "--dir", str(tmp_path), "--redis-url", redis_url])
        assert args.handler(args) == 0
        return json.loads(capsys.readouterr().out)

    assert run("reindex") == {"shards": 3, "contents": 9, "aliases": 9}
    index = FeatureIndex(client)
    assert index.lookup(MV, "ns", recs[4].image_id) is not None
    stats = run("stats")
    assert stats["files"][MV]["shards"] == 3 and stats["files"][MV]["images"] == 9
    assert stats["files"][MV]["regions"] == sum(r.num_boxes for r in recs)
    assert stats["index"] == {"contents": {MV: 9}, "aliases": {"ns": 9}}
    summary = run("compact", "--min-rows", "5")
    assert summary["merged"] == 3 and len(summary["written"]) == 1
    readers = ShardReaders(tmp_path)
    for rec in recs:
        loc = index.lookup(MV, "ns", rec.image_id)
        assert loc is not None and loc.shard == summary["written"][0]
        assert readers.get(loc).image_id == rec.image_id
    readers.close()
