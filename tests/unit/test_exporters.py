"""Exporters and readers: every format round-trips every field it holds."""

from __future__ import annotations

import base64
import pickle
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote

import h5py
import numpy as np
import pytest

from butd.store.export_npz import npz_name
from butd.store.exporters import (
    EXPORTERS,
    export_h5_dense,
    export_h5_ragged,
    export_lxmert_tsv,
    export_npz,
    export_tsv,
    imgid2idx_path,
)
from butd.store.h5 import FeatureFile
from butd.store.h5_writer import write_feature_file
from butd.store.readers import (
    read_h5_dense,
    read_h5_ragged,
    read_imgid2idx,
    read_lxmert_tsv,
    read_npz_dir,
    read_tsv,
)
from butd.store.records import FeatureRecord
from tests.unit.test_h5 import MV, make_records, meta

LABELS = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")


def coco_id(i: int) -> int:
    return 42 + 1000 * i


def coco_records(n: int, **kw: object) -> list[FeatureRecord]:
    """Records stored as ``butd extract val2014-root/`` names COCO files (rule ``path``)."""
    return [
        replace(r, image_id=f"val2014/COCO_val2014_{coco_id(i):012d}.jpg")
        for i, r in enumerate(make_records(n, **kw))  # type: ignore[arg-type]
    ]


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, list[FeatureRecord]]:
    recs = coco_records(9, min_boxes=2, max_boxes=10, seed=5)
    path = tmp_path / "src.h5"
    write_feature_file(path, recs, **meta(id_policy={"rule": "path"}))
    return path, recs


def stem_of(rec: FeatureRecord) -> str:
    return rec.image_id.split("/")[-1].removesuffix(".jpg")


def fp16(rec: FeatureRecord) -> np.ndarray:
    """What the store holds: fp16, widened exactly to fp32 by the exporters."""
    return rec.features.astype(np.float16).astype(np.float32)


def assert_record(
    got: FeatureRecord, want: FeatureRecord, keep: np.ndarray | None = None, image_id: str = ""
) -> None:
    sel = np.arange(want.num_boxes) if keep is None else keep
    assert got.image_id == (image_id or want.image_id)
    assert (got.image_w, got.image_h) == (want.image_w, want.image_h)
    assert got.features.dtype == np.float32
    np.testing.assert_array_equal(got.features, fp16(want)[sel])
    np.testing.assert_array_equal(got.boxes, want.boxes[sel])
    for name in LABELS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name)[sel])


def spatial_reference(rec: FeatureRecord) -> np.ndarray:
    """hengyuan-hu detection_features_converter.py, written out independently."""
    w, h = rec.image_w, rec.image_h
    x1, y1, x2, y2 = (rec.boxes[:, j].astype(np.float64) for j in range(4))
    bw, bh = x2 - x1, y2 - y1
    return np.stack([x1 / w, y1 / h, x1 / w + bw / w, y1 / h + bh / h, bw / w, bh / h], axis=1)


def test_h5_dense_pads_and_round_trips(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "train36.hdf5"
    with FeatureFile(path) as ff:
        assert export_h5_dense(ff, out, k=10, allow_padding=True) == len(recs)
    got = list(read_h5_dense(out))
    assert len(got) == len(recs)
    for g, want in zip(got, recs, strict=True):
        assert_record(g, want)
    with h5py.File(out, "r") as h5:
        assert h5["image_features"].shape == (9, 10, 32)
        assert h5["image_features"].dtype == np.float32
        for i, want in enumerate(recs):
            n = want.num_boxes
            assert h5["num_boxes"][i] == n
            assert not h5["image_features"][i, n:].any() and not h5["image_bb"][i, n:].any()
            assert (h5["objects_id"][i, n:] == -1).all()
            np.testing.assert_allclose(
                h5["spatial_features"][i, :n], spatial_reference(want), rtol=1e-6, atol=1e-6
            )
        assert h5.attrs["truncated_images"] == 0
        assert h5.attrs["padded_images"] == sum(r.num_boxes < 10 for r in recs)
    mapping = read_imgid2idx(imgid2idx_path(out))
    assert mapping == {coco_id(i): i for i in range(len(recs))}
    assert imgid2idx_path(out).name == "train36_imgid2idx.pkl"


def test_h5_dense_truncates_to_top_k_by_confidence(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "d.h5"
    k = 4
    with FeatureFile(path) as ff:
        export_h5_dense(ff, out, k=k, allow_padding=True)
    for g, want in zip(read_h5_dense(out), recs, strict=True):
        conf = want.objects_conf.tolist()
        chosen: list[int] = []
        for _ in range(min(k, len(conf))):  # greedy max, lower index on ties
            best = max((c, -j) for j, c in enumerate(conf) if j not in chosen)
            chosen.append(-best[1])
        assert_record(g, want, np.array(sorted(chosen), dtype=np.int64))
    with h5py.File(out, "r") as h5:
        assert h5.attrs["truncated_images"] == sum(r.num_boxes > k for r in recs)


def test_h5_ragged_pos_boxes(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "val.hdf5"
    with FeatureFile(path) as ff:
        export_h5_ragged(ff, out)
    for g, want in zip(read_h5_ragged(out), recs, strict=True):
        assert_record(g, want)
    with h5py.File(out, "r") as h5:
        ends = np.cumsum([r.num_boxes for r in recs])
        np.testing.assert_array_equal(h5["pos_boxes"][:, 1], ends)
        np.testing.assert_array_equal(h5["pos_boxes"][1:, 0], ends[:-1])
        assert h5["pos_boxes"].dtype == np.int32
        spatial = np.concatenate([spatial_reference(r) for r in recs])
        np.testing.assert_allclose(h5["spatial_features"][:], spatial, rtol=1e-6, atol=1e-6)
    assert read_imgid2idx(imgid2idx_path(out))[coco_id(3)] == 3


def test_tsv_generate_tsv_fields(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "x.tsv"
    with FeatureFile(path) as ff:
        export_tsv(ff, out)
    lines = out.read_text().splitlines()
    assert len(lines) == len(recs)
    first = lines[0].split("\t")  # independent decode of one raw line
    assert first[:4] == [str(coco_id(0)), str(recs[0].image_w), str(recs[0].image_h),
                         str(recs[0].num_boxes)]  # fmt: skip
    raw = np.frombuffer(base64.b64decode(first[5]), dtype=np.float32)
    np.testing.assert_array_equal(raw.reshape(recs[0].num_boxes, -1), fp16(recs[0]))
    for i, (row, want) in enumerate(zip(read_tsv(out), recs, strict=True)):
        assert set(row) == {"image_id", "image_w", "image_h", "num_boxes", "boxes", "features"}
        assert (row["image_id"], row["image_w"], row["image_h"]) == (
            str(coco_id(i)), want.image_w, want.image_h)  # fmt: skip
        np.testing.assert_array_equal(row["boxes"], want.boxes)
        np.testing.assert_array_equal(row["features"], fp16(want))


def test_lxmert_tsv_h_before_w(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "obj36.tsv"
    with FeatureFile(path) as ff:
        export_lxmert_tsv(ff, out)
    first = out.read_text().splitlines()[0].split("\t")
    assert first[1:3] == [str(recs[0].image_h), str(recs[0].image_w)]
    ids = np.frombuffer(base64.b64decode(first[3]), dtype=np.int64)
    np.testing.assert_array_equal(ids, recs[0].objects_id)
    for g, want in zip(read_lxmert_tsv(out, model_version=MV), recs, strict=True):
        assert_record(g, want, image_id=stem_of(want))


def test_npz_per_image_and_name_sanitising(tmp_path: Path, source) -> None:
    path, recs = source
    out = tmp_path / "npz"
    with FeatureFile(path) as ff:
        assert export_npz(ff, out) == len(recs)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{stem_of(r)}.npz" for r in recs)  # MILVLG: the file stem
    stored = tmp_path / "npz-stored"
    with FeatureFile(path) as ff:
        export_npz(ff, stored, ids="stored")
    assert all("%2F" in p.name for p in stored.iterdir())  # every stored id here has a "/"
    assert {unquote(p.name[:-4]) for p in stored.iterdir()} == {r.image_id for r in recs}
    by_id = {stem_of(r): r for r in recs}
    for g in read_npz_dir(out):
        assert_record(g, by_id[g.image_id], image_id=g.image_id)
    with np.load(out / npz_name(stem_of(recs[0])), allow_pickle=True) as data:
        assert int(data["num_bbox"]) == recs[0].num_boxes
        info = data["info"].item()
        assert info["num_boxes"] == recs[0].num_boxes and info["image_h"] == recs[0].image_h


def test_integer_ids_give_int_keys(tmp_path: Path) -> None:
    recs = [
        FeatureRecord(**{**r.__dict__, "image_id": str(1000 + i)})
        for i, r in enumerate(make_records(3))
    ]
    path = tmp_path / "s.h5"
    write_feature_file(path, recs, **meta())
    with FeatureFile(path) as ff:
        export_h5_ragged(ff, tmp_path / "r.h5")
    with imgid2idx_path(tmp_path / "r.h5").open("rb") as fh:
        assert pickle.load(fh) == {1000: 0, 1001: 1, 1002: 2}


def test_int_keys_refuse_ids_without_an_integer_and_collisions(tmp_path: Path) -> None:
    from butd.store.image_ids import ImageIdError

    for ids, bad in ((["1", "a.jpg"], "'a.jpg'"), (["42", "042"], "'042'")):
        recs = [replace(r, image_id=i) for r, i in zip(make_records(2), ids, strict=True)]
        path = tmp_path / f"{bad}.h5"
        write_feature_file(path, recs, **meta(id_policy={"rule": "path"}))
        with FeatureFile(path) as ff, pytest.raises(ImageIdError) as err:
            export_tsv(ff, tmp_path / "x.tsv")
        assert bad in str(err.value) and "rule path" in str(err.value)
        assert "--image-ids coco" in str(err.value)
        with FeatureFile(path) as ff:  # --ids stored writes them as they are
            export_tsv(ff, tmp_path / "x.tsv", ids="stored")
        assert [r["image_id"] for r in read_tsv(tmp_path / "x.tsv")] == ids
    assert not (tmp_path / "x.tsv.tmp").exists()


def test_h5_dense_refuses_adaptive_files_unless_allowed(tmp_path: Path, source, caplog) -> None:
    from butd.store.exporters import PaddingError

    path, recs = source
    out = tmp_path / "d.h5"
    with FeatureFile(path) as ff, pytest.raises(PaddingError) as err:
        export_h5_dense(ff, out, k=36)
    assert "--min-boxes 36 --max-boxes 36" in str(err.value)
    assert f"{len(recs)} of {len(recs)} images have fewer than K=36" in str(err.value)
    assert not out.exists() and not imgid2idx_path(out).exists()
    with FeatureFile(path) as ff:
        export_h5_dense(ff, out, k=36, allow_padding=True)
    assert f"{len(recs)} of {len(recs)} images padded" in caplog.text


def test_registry_names() -> None:
    assert set(EXPORTERS) == {
        "h5-dense", "h5-ragged", "tsv", "lxmert-tsv", "npz", "npz-mcan", "h5-grid"
    }  # fmt: skip
    with pytest.raises(ValueError):
        npz_name("")


def test_cli_export_every_format(tmp_path: Path, source) -> None:
    import argparse

    from butd.cli import export

    path, recs = source
    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers())
    readers = {
        "h5-dense": read_h5_dense,
        "h5-ragged": read_h5_ragged,
        "lxmert-tsv": read_lxmert_tsv,
        "npz": read_npz_dir,
    }
    for fmt in export.FORMATS:
        out = tmp_path / f"out-{fmt}"
        argv = ["export", str(path), "--format", fmt, "--out", str(out), "--allow-padding"]
        args = parser.parse_args(argv)
        if fmt == "h5-grid":  # a file without grids: refused (tests/unit/test_grids.py exports)
            assert args.handler(args) == 2 and not out.exists()
            continue
        assert args.handler(args) == 0
        if fmt == "tsv":
            assert [r["image_id"] for r in read_tsv(out)] == [str(coco_id(i)) for i in range(9)]
            continue
        if fmt == "npz-mcan":
            assert len(list(out.iterdir())) == len(recs)
            continue
        got = {g.image_id.split("/")[-1].removesuffix(".jpg"): g for g in readers[fmt](out)}
        for want in recs:
            assert_record(got[stem_of(want)], want, image_id=got[stem_of(want)].image_id)
    with pytest.raises(SystemExit):
        parser.parse_args(["export", str(path), "--format", "parquet", "--out", "x"])
