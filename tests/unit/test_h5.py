"""Ragged HDF5 feature files: round trip, append/resume, atomic write, refusals."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

from butd.store.h5 import FeatureFile, FeatureFileError
from butd.store.h5_writer import FeatureFileWriter, write_feature_file
from butd.store.records import FeatureRecord, StoredRow

MV = "mv-test-1"
VOCAB_O = [f"obj{i}" for i in range(16)]
VOCAB_A = [f"attr{i}" for i in range(8)]


def make_records(
    n: int,
    *,
    dim: int = 32,
    seed: int = 0,
    min_boxes: int = 3,
    max_boxes: int = 12,
    model_version: str = MV,
    prefix: str = "img",
) -> list[FeatureRecord]:
    """Random but valid records: boxes inside the image, fp32 features >= 0, 0-based labels."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        k = int(rng.integers(min_boxes, max_boxes + 1))
        w, h = int(rng.integers(50, 900)), int(rng.integers(50, 900))
        x1 = rng.uniform(0, w / 2, k)
        y1 = rng.uniform(0, h / 2, k)
        boxes = np.stack(
            [x1, y1, x1 + rng.uniform(1, w / 2, k), y1 + rng.uniform(1, h / 2, k)], axis=1
        ).astype(np.float32)
        out.append(
            FeatureRecord(
                image_id=f"{prefix}/{seed}_{i}",
                image_w=w,
                image_h=h,
                boxes=boxes,
                features=(rng.random((k, dim)) * 10).astype(np.float32),
                objects_id=rng.integers(0, len(VOCAB_O), k).astype(np.int64),
                objects_conf=rng.random(k).astype(np.float32),
                attrs_id=rng.integers(0, len(VOCAB_A), k).astype(np.int64),
                attrs_conf=rng.random(k).astype(np.float32),
                model_version=model_version,
            )
        )
    return out


def sha_of(record: FeatureRecord) -> str:
    """The content key the tests file a record under (a hash of its id: unique per record)."""
    return hashlib.sha256(record.image_id.encode()).hexdigest()


def keyed(records: list[FeatureRecord], namespace: str = "ns") -> list[StoredRow]:
    """``records`` as shard rows: each with its ``sha_of`` and ``namespace``."""
    return [StoredRow(r, sha_of(r), namespace) for r in records]


def meta(dim: int = 32, **kw: object) -> dict[str, object]:
    base: dict[str, object] = {
        "model_version": MV,
        "config": {"conf_thresh": 0.2, "max_boxes": 100},
        "objects_vocab": VOCAB_O,
        "attributes_vocab": VOCAB_A,
        "feature_dim": dim,
    }
    base.update(kw)
    return base


def assert_same(got: FeatureRecord, want: FeatureRecord, *, fp16: bool) -> None:
    assert got.image_id == want.image_id
    assert (got.image_w, got.image_h) == (want.image_w, want.image_h)
    np.testing.assert_array_equal(got.boxes, want.boxes)
    for name in ("objects_id", "objects_conf", "attrs_id", "attrs_conf"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    if fp16:
        assert got.features.dtype == np.float16
        np.testing.assert_array_equal(got.features, want.features.astype(np.float16))
        # fp16 keeps ~11 significant bits: relative error <= 2**-11 for normal values.
        np.testing.assert_allclose(got.features, want.features, rtol=2**-11, atol=1e-7)
    else:
        assert got.features.dtype == np.float32
        np.testing.assert_array_equal(got.features, want.features)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_every_field(tmp_path: Path, dtype: str) -> None:
    recs = make_records(20)
    path = tmp_path / "f.h5"
    assert write_feature_file(path, recs, batch=7, feature_dtype=dtype, **meta()) == 20
    with FeatureFile(path) as ff:
        assert len(ff) == 20
        assert ff.ids() == [r.image_id for r in recs]
        assert ff.model_version == MV
        assert ff.config == {"conf_thresh": 0.2, "max_boxes": 100}
        assert ff.objects_vocab == VOCAB_O and ff.attributes_vocab == VOCAB_A
        for want in reversed(recs):
            assert want.image_id in ff
            assert_same(ff.get(want.image_id), want, fp16=dtype == "float16")
        assert [r.image_id for r in ff] == ff.ids()
        assert "nope" not in ff
        with pytest.raises(KeyError):
            ff.get("nope")
        np.testing.assert_array_equal(ff.num_boxes(), [r.num_boxes for r in recs])


def test_layout_matches_contract(tmp_path: Path) -> None:
    recs = make_records(5)
    path = tmp_path / "f.h5"
    write_feature_file(path, recs, **meta())
    total = sum(r.num_boxes for r in recs)
    with h5py.File(path, "r") as f:
        assert f["offsets"].dtype == np.int64
        np.testing.assert_array_equal(
            f["offsets"][:], np.concatenate([[0], np.cumsum([r.num_boxes for r in recs])])
        )
        assert f["image_w"].dtype == np.int32 and f["image_h"].dtype == np.int32
        assert f["features"].shape == (total, 32) and f["features"].dtype == np.float16
        assert f["boxes"].shape == (total, 4) and f["boxes"].dtype == np.float32
        assert f["objects_id"].dtype == np.int64 and f["attrs_conf"].dtype == np.float32
        assert f["features"].compression is None
        assert json.loads(f.attrs["objects_vocab"]) == VOCAB_O
        assert f.attrs["feature_dtype"] == "float16"


def test_append_resumes_and_skips_known_ids(tmp_path: Path) -> None:
    recs = make_records(12)
    path = tmp_path / "f.h5"
    with FeatureFileWriter(path, **meta()) as w:  # type: ignore[arg-type]
        w.append(recs[:5])
    with FeatureFileWriter(path, **meta()) as w:  # type: ignore[arg-type]
        assert w.ids() == {r.image_id for r in recs[:5]}
        todo = [r for r in recs if r.image_id not in w.ids()]
        w.append(todo)
    with FeatureFile(path) as ff:
        assert ff.ids() == [r.image_id for r in recs]
        for want in recs:
            assert_same(ff.get(want.image_id), want, fp16=True)


def test_refuses_other_version_dim_dtype_and_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    recs = make_records(3)
    with FeatureFileWriter(path, **meta()) as w:  # type: ignore[arg-type]
        w.append(recs)
        with pytest.raises(FeatureFileError, match="already"):
            w.append(recs[:1])
        with pytest.raises(FeatureFileError, match="model_version"):
            w.append(make_records(1, model_version="other", prefix="x"))
        with pytest.raises(FeatureFileError, match="D=16"):
            w.append(make_records(1, dim=16, prefix="y"))
    with pytest.raises(FeatureFileError, match="model_version"):
        FeatureFileWriter(path, **meta(model_version="other"))  # type: ignore[arg-type]
    with pytest.raises(FeatureFileError, match="feature_dim"):
        FeatureFileWriter(path, **meta(dim=64))  # type: ignore[arg-type]
    with pytest.raises(FeatureFileError, match="feature_dtype"):
        FeatureFileWriter(path, feature_dtype="float32", **meta())  # type: ignore[arg-type]
    with FeatureFile(path) as ff:  # the refused appends changed nothing
        assert ff.ids() == [r.image_id for r in recs]


def test_partial_append_is_trimmed_on_reopen(tmp_path: Path) -> None:
    recs = make_records(6)
    path = tmp_path / "f.h5"
    with FeatureFileWriter(path, **meta()) as w:  # type: ignore[arg-type]
        w.append(recs[:3])
    # Simulate a crash after the rows of the next append were written, before offsets.
    with h5py.File(path, "a") as f:
        r = f["features"].shape[0]
        f["features"].resize(r + 9, axis=0)
        f["boxes"].resize(r + 9, axis=0)
        f["image_ids"].resize((4,))
        f["image_ids"][3] = "ghost"
    with FeatureFileWriter(path, **meta()) as w:  # type: ignore[arg-type]
        assert w.ids() == {r.image_id for r in recs[:3]}
        w.append(recs[3:])
    with FeatureFile(path) as ff:
        assert ff.ids() == [r.image_id for r in recs]
        for want in recs:
            assert_same(ff.get(want.image_id), want, fp16=True)


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write_feature_file(path, make_records(2), **meta())

    def broken() -> object:
        yield from make_records(3, seed=1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_feature_file(path, broken(), batch=1, **meta())  # type: ignore[arg-type]
    with FeatureFile(path) as ff:
        assert len(ff) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.h5"]


def test_row_keys_round_trip_as_columns_never_through_extra(tmp_path: Path) -> None:
    recs = make_records(4)
    stray = replace(recs[3], extra={"content_sha256": "f" * 64, "namespace": "x"})
    rows = [*keyed(recs[:3]), stray]  # a bare record is stored without keys, whatever its extra
    path = tmp_path / "f.h5"
    write_feature_file(path, rows, **meta())
    with FeatureFile(path) as ff:
        assert ff.content_sha256() == [*(sha_of(r) for r in recs[:3]), ""]
        assert ff.namespaces() == ["ns"] * 3 + [""]
        back = ff.read_stored(2)
        assert (back.image_id, back.content_sha256, back.namespace) == (
            recs[2].image_id,
            sha_of(recs[2]),
            "ns",
        )
        assert_same(back.record, recs[2], fp16=True)
        assert ff.read_row(2).extra == {}  # the store's keys are never in extra
        with pytest.raises(IndexError):
            ff.read_row(4)


def test_empty_and_zero_box_records(tmp_path: Path) -> None:
    path = tmp_path / "f.h5"
    write_feature_file(path, [], **meta())
    with FeatureFile(path) as ff:
        assert len(ff) == 0 and ff.ids() == []
    rec = make_records(1, min_boxes=0, max_boxes=0)[0]
    write_feature_file(path, [rec, *make_records(2, seed=3)], **meta())
    with FeatureFile(path) as ff:
        got = ff.get(rec.image_id)
        assert got.num_boxes == 0 and got.features.shape == (0, 32)
