"""StoreReader: the gateway's reads of shards sealed and indexed as the workers do."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import numpy as np
import pytest
import redis

from butd.store.index import FeatureIndex, reindex
from butd.store.readers import read_lxmert_tsv
from butd.store.records import StoredRow
from butd.store.shard_store import ExportRefusedError, NothingStoredError, StoreReader, _nbytes
from butd.store.shards import scan_shard, seal_shard
from tests.unit.app_fakes import ATTRIBUTES, MODEL_VERSION, OBJECTS, make_record


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _seal(root: Path, index: FeatureIndex, ids: list[int], namespace: str = "ds") -> None:
    """Seal and index one shard as ``butd.store.shard_store.StoreWriter`` does."""
    recs = [StoredRow(make_record(f"{i}.jpg", seed=i), _sha(i), namespace) for i in ids]
    meta = {
        "config": {"description": "fake model"},
        "objects_vocab": OBJECTS,
        "attributes_vocab": ATTRIBUTES,
        "feature_dim": 8,
    }
    info = seal_shard(root / "shards", recs, model_version=MODEL_VERSION, meta=meta)
    index.put_shard(scan_shard(root / "shards", info.name))


@pytest.fixture
def index(redis_url: str) -> FeatureIndex:
    return FeatureIndex(redis.Redis.from_url(redis_url))


def test_get_resolve_and_vocabularies(tmp_path: Path, index: FeatureIndex) -> None:
    store = StoreReader(tmp_path, index)
    assert store.get(MODEL_VERSION, _sha(1)) is None
    _seal(tmp_path, index, [1, 2])
    got = store.get(MODEL_VERSION, _sha(2))
    assert got is not None and got.sha256 == _sha(2)
    np.testing.assert_array_equal(got.record.features, make_record("x", seed=2).features)
    assert got.objects_vocab == OBJECTS and got.description == "fake model"
    assert store.get("other-version", _sha(2)) is None
    assert store.resolve("ds", "1.jpg") == _sha(1)
    assert store.resolve("other", "1.jpg") is None
    store.close()


def test_gateway_alias_is_sealed_and_survives_reindex(
    tmp_path: Path, index: FeatureIndex, redis_url: str
) -> None:
    _seal(tmp_path, index, [1])
    store = StoreReader(tmp_path, index)
    store.add_alias("mine", "cat.jpg", _sha(1))
    store.add_alias("mine", "cat.jpg", _sha(9))  # first wins
    assert store.resolve("mine", "cat.jpg") == _sha(1)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    assert store.resolve("mine", "cat.jpg") is None
    reindex(tmp_path / "shards", client)
    assert store.resolve("mine", "cat.jpg") == _sha(1)
    assert store.get(MODEL_VERSION, _sha(1)) is not None


@pytest.mark.parametrize("fmt", ["lxmert-tsv", "h5-dense", "npz"])
def test_export_uses_the_job_ids(tmp_path: Path, index: FeatureIndex, fmt: str) -> None:
    _seal(tmp_path, index, [1, 2])
    store = StoreReader(tmp_path, index)
    out = tmp_path / f"out.{fmt}"
    wanted = ["1.jpg", "2.jpg", "nope.jpg"]
    if fmt == "h5-dense":  # adaptive records: refused unless padding is allowed
        with pytest.raises(ExportRefusedError, match="--allow-padding"):
            store.export(MODEL_VERSION, "ds", wanted, fmt, out)
    options = {"allow_padding": True} if fmt == "h5-dense" else None
    assert store.export(MODEL_VERSION, "ds", wanted, fmt, out, options) == 2
    if fmt == "lxmert-tsv":  # ids as LXMERT keys them: the file stem
        rows = list(read_lxmert_tsv(out))
        assert [r.image_id for r in rows] == ["1", "2"]
        np.testing.assert_array_equal(
            rows[1].features, make_record("x", seed=2).features.astype(np.float32)
        )
    elif fmt == "npz":
        with zipfile.ZipFile(out) as zf:
            assert sorted(zf.namelist()) == ["1.npz", "2.npz"]  # MILVLG: {stem}.npz
    else:
        assert out.stat().st_size > 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("tmp")]
    with pytest.raises(NothingStoredError):
        store.export(MODEL_VERSION, "ds", ["nope.jpg"], fmt, tmp_path / "none")


def test_record_cache_serves_hot_records_within_its_budget(
    tmp_path: Path, index: FeatureIndex
) -> None:
    _seal(tmp_path, index, [1, 2, 3])
    size = _nbytes(make_record("x", seed=1))
    store = StoreReader(tmp_path, index, cache_bytes=2 * size)  # room for two records
    for i in (1, 2, 3):  # reading 3 evicts 1, the least recently used
        assert store.get(MODEL_VERSION, _sha(i)) is not None
    store.readers.close()
    for shard in (tmp_path / "shards").glob("*.h5"):
        shard.unlink()  # from now on only the cache can answer
    assert store.get(MODEL_VERSION, _sha(3)) is not None
    assert store.get(MODEL_VERSION, _sha(2)) is not None
    assert store.get(MODEL_VERSION, _sha(1)) is None  # evicted, and its shard is gone
    assert store._cache_used <= 2 * size
