"""The store's write side on a real redis-server: seal, then index; aliases; rebuildable."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import redis

from butd.store.h5 import FeatureFile
from butd.store.index import FeatureIndex, reindex
from butd.store.records import FeatureRecord, StoredRow
from butd.store.shard_store import StoreWriter
from butd.store.shards import Alias, list_shards, read_aliases
from butd.workers import queue as q
from tests.redis_proc import RedisProcess

META = {"objects_vocab": ["a"], "attributes_vocab": ["b"], "feature_dim": 4}


def item(sha: str, image_id: str, namespace: str = "ns", n: int = 3) -> StoredRow:
    rec = FeatureRecord(
        image_id=image_id,
        image_w=10,
        image_h=8,
        boxes=np.tile(np.array([[0, 0, 5, 5]], np.float32), (n, 1)),
        features=np.full((n, 4), 0.5, np.float32),
        objects_id=np.zeros(n, np.int64),
        objects_conf=np.ones(n, np.float32),
        attrs_id=np.zeros(n, np.int64),
        attrs_conf=np.ones(n, np.float32),
        model_version="mv",
    )
    return StoredRow(rec, sha, namespace)


def test_put_seals_then_indexes_rows_and_only_new_aliases(redis_url: str, tmp_path: Path) -> None:
    r = q.connect(redis_url)
    index = FeatureIndex(r)
    sink = StoreWriter(tmp_path, index, writer_id="w1", meta=META)
    a, b = "a" * 64, "b" * 64
    assert not sink.has("mv", a)
    rows = [item(a, "x.jpg"), item(b, "y.jpg", namespace="ns3")]
    assert all(row.record.extra == {} for row in rows)  # the keys travel in the typed row
    sink.put("batch1", rows, "mv", {"max_boxes": 10})
    assert sink.has("mv", a) and sink.has("mv", b) and not sink.has("other", a)
    (first,) = list_shards(tmp_path / "shards")
    with FeatureFile(tmp_path / "shards" / first) as f:
        assert f.content_sha256() == [a, b] and f.ids() == ["x.jpg", "y.jpg"]
        assert f.namespaces() == ["ns", "ns3"]
        back = f.read_stored(1)
        assert (back.image_id, back.content_sha256, back.namespace) == ("y.jpg", b, "ns3")
        assert f.config == {"max_boxes": 10} and f.model_version == "mv"
    assert index.lookup("mv", "ns3", "y.jpg") is not None

    # A cached image under a new id: no rows, one alias-only shard; the same again: nothing.
    sink.put("batch2", [], "mv", {}, [Alias("ns", "x.jpg", a), Alias("ns2", "copy.jpg", a)])
    shards = list_shards(tmp_path / "shards")
    assert len(shards) == 2
    (alias_shard,) = set(shards) - {first}
    assert [(x.namespace, x.image_id) for x in read_aliases(tmp_path / "shards" / alias_shard)] == [
        ("ns2", "copy.jpg")
    ]
    sink.put("batch3", [], "mv", {}, [Alias("ns2", "copy.jpg", a)])
    assert len(list_shards(tmp_path / "shards")) == 2
    assert index.lookup_alias("ns2", "copy.jpg") == a
    assert not (tmp_path / "aliases").exists()  # the index and the shards only: no side files

    # The index is rebuilt from the files alone.
    r.flushdb()
    assert not sink.has("mv", a)
    result = reindex(tmp_path / "shards", r)
    assert (result.contents, result.aliases) == (2, 3)
    assert sink.has("mv", b) and index.lookup_alias("ns2", "copy.jpg") == a


def test_a_shard_sealed_while_redis_is_down_is_indexed_once_it_is_back(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    r = q.connect(redis_proc.url)
    sink = StoreWriter(tmp_path, FeatureIndex(r), writer_id="w1", meta=META)
    sink.put("warm", [item("c" * 64, "warm.jpg")], "mv", {})
    redis_proc.stop()
    with pytest.raises(redis.ConnectionError):
        sink.put("outage", [item("d" * 64, "z.jpg")], "mv", {})
    assert len(list_shards(tmp_path / "shards")) == 2  # sealed on disk, not yet indexed
    redis_proc.start()
    assert sink.has("mv", "d" * 64)  # indexed before the lookup: a retry computes nothing
    assert FeatureIndex(r).lookup_alias("ns", "z.jpg") == "d" * 64


def test_a_batch_stored_meanwhile_by_another_worker_leaves_no_second_copy(
    redis_proc: RedisProcess, tmp_path: Path
) -> None:
    """w1 is cut off from Redis mid-batch; w2 reclaims the entry and stores it; w1 seals anyway
    (it cannot ask the index) and, once Redis answers, finds every row stored: its shard goes."""
    r = q.connect(redis_proc.url)
    w1 = StoreWriter(tmp_path / "w1", FeatureIndex(r), writer_id="w1", meta=META)
    w2 = StoreWriter(tmp_path / "w2", FeatureIndex(r), writer_id="w2", meta=META)
    batch = [item("e" * 64, "p.jpg"), item("f" * 64, "q.jpg")]
    redis_proc.stop()
    with pytest.raises(redis.ConnectionError):
        w1.put("cut-off", batch, "mv", {})
    assert len(list_shards(tmp_path / "w1" / "shards")) == 1  # sealed blind, not yet indexed
    redis_proc.start()
    w2.put("reclaimed", batch, "mv", {})
    (kept,) = list_shards(tmp_path / "w2" / "shards")
    assert w1.has("mv", "e" * 64)  # indexes what it sealed: nothing new, so it is deleted
    assert list_shards(tmp_path / "w1" / "shards") == []
    assert FeatureIndex(r).lookup_content("mv", "f" * 64).shard == kept


def test_rows_stored_meanwhile_are_left_out_and_the_rest_indexed_at_their_rows(
    redis_url: str, tmp_path: Path
) -> None:
    index = FeatureIndex(q.connect(redis_url))
    other = StoreWriter(tmp_path / "other", index, writer_id="w2", meta=META)
    sink = StoreWriter(tmp_path / "mine", index, writer_id="w1", meta=META)
    a, b, c = "a" * 64, "b" * 64, "c" * 64
    other.put("first", [item(b, "y.jpg")], "mv", {})
    sink.put("batch", [item(a, "x.jpg", n=2), item(b, "y.jpg"), item(c, "z.jpg", n=5)], "mv", {})
    (shard,) = list_shards(tmp_path / "mine" / "shards")
    with FeatureFile(tmp_path / "mine" / "shards" / shard) as f:
        assert f.content_sha256() == [a, c]
        for sha, n in ((a, 2), (c, 5)):
            where = index.lookup_content("mv", sha)
            assert where is not None and where.shard == shard
            assert f.content_sha256()[where.row] == sha and f.read_row(where.row).num_boxes == n
