"""ShardDirStore: the gateway's read side of the sealed shards the workers write."""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.errors import NotFoundError
from service.shard_store import ShardDirStore, alias_file
from store.h5 import FeatureFile, write_feature_file
from store.readers import read_lxmert_tsv
from tests.unit.app_fakes import ATTRIBUTES, MODEL_VERSION, OBJECTS, make_record


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _seal(root: Path, name: str, ids: list[int]) -> None:
    """Write a shard as the worker's sink does: image_id = content sha256."""
    recs = [
        replace(make_record(_sha(i), seed=i), extra={"content_sha256": _sha(i), "namespace": ""})
        for i in ids
    ]
    (root / "shards").mkdir(parents=True, exist_ok=True)
    write_feature_file(
        root / "shards" / f"{name}.h5",
        recs,
        model_version=MODEL_VERSION,
        config={"description": "fake model"},
        objects_vocab=OBJECTS,
        attributes_vocab=ATTRIBUTES,
        feature_dim=8,
    )


def test_get_finds_records_sealed_after_opening(tmp_path: Path) -> None:
    store = ShardDirStore(tmp_path)
    assert store.get(MODEL_VERSION, _sha(1)) is None
    _seal(tmp_path, "a", [1, 2])
    _seal(tmp_path, "b", [3])
    got = store.get(MODEL_VERSION, _sha(3))
    assert got is not None and got.sha256 == _sha(3)
    np.testing.assert_array_equal(got.record.features, make_record("x", seed=3).features)
    assert got.objects_vocab == OBJECTS and got.description == "fake model"
    assert store.get("other-version", _sha(3)) is None
    assert store.get(MODEL_VERSION, _sha(2)) is not None
    store.close()


def test_open_files_are_bounded(tmp_path: Path) -> None:
    for i in range(5):
        _seal(tmp_path, f"s{i}", [i])
    store = ShardDirStore(tmp_path, max_open=2)
    for i in range(5):
        assert store.get(MODEL_VERSION, _sha(i)) is not None
    assert len(store._open) == 2
    store.close()


def test_aliases_written_by_workers_and_gateway(tmp_path: Path) -> None:
    store = ShardDirStore(tmp_path)
    path = alias_file(tmp_path, "coco")
    path.write_text(f"a.jpg\t{_sha(1)}\n")  # as the worker appends
    assert store.resolve("coco", "a.jpg") == _sha(1)
    store.add_alias("coco", "a.jpg", _sha(2))  # a newer line wins
    store.add_alias("coco", "b/c.jpg", _sha(3))
    store.add_alias("coco", "b/c.jpg", _sha(3))  # idempotent: no new line
    assert store.resolve("coco", "a.jpg") == _sha(2)
    assert store.resolve("coco", "b/c.jpg") == _sha(3)
    assert store.resolve("other", "a.jpg") is None
    assert len(path.read_text().splitlines()) == 3


@pytest.mark.parametrize("fmt", ["lxmert-tsv", "h5-ragged", "npz"])
def test_export_uses_caller_ids(tmp_path: Path, fmt: str) -> None:
    _seal(tmp_path, "a", [1, 2])
    store = ShardDirStore(tmp_path)
    store.add_alias("ds", "one.jpg", _sha(1))
    store.add_alias("ds", "two.jpg", _sha(2))
    out = tmp_path / f"out.{fmt}"
    count = store.export(MODEL_VERSION, "ds", ["one.jpg", "two.jpg", "missing.jpg"], fmt, out)
    assert count == 2
    if fmt == "lxmert-tsv":
        rows = list(read_lxmert_tsv(out))
        assert [r.image_id for r in rows] == ["one.jpg", "two.jpg"]
        np.testing.assert_allclose(
            rows[0].features, make_record("x", seed=1).features.astype(np.float32)
        )
    elif fmt == "npz":
        with zipfile.ZipFile(out) as zf:
            assert sorted(zf.namelist()) == ["one.jpg.npz", "two.jpg.npz"]
    else:
        assert out.exists() and out.stat().st_size > 0
    assert not [p for p in os.listdir(tmp_path) if p.startswith("tmp")]
    with pytest.raises(NotFoundError):
        store.export(MODEL_VERSION, "ds", ["missing.jpg"], fmt, tmp_path / "none")


def test_replaced_shard_is_reindexed(tmp_path: Path) -> None:
    _seal(tmp_path, "a", [1])
    store = ShardDirStore(tmp_path)
    assert store.get(MODEL_VERSION, _sha(1)) is not None
    _seal(tmp_path, "a", [2, 1])  # a redelivered batch rewrote its file
    got = store.get(MODEL_VERSION, _sha(1))
    assert got is not None
    with FeatureFile(tmp_path / "shards" / "a.h5") as f:
        assert f.content_sha256()[1] == _sha(1)
    np.testing.assert_array_equal(got.record.features, make_record("x", seed=1).features)
