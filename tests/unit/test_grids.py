"""Grid features from the same detector pass: regions unchanged to the byte, the grid equal to an
independent computation, and the grid's path through the record, the HDF5 files, the wire and the
``h5-grid`` export (read the way grid-feature code reads it).

Reference for the grid: res5 run on one image's res4 map alone (no batch), then each cell the plain
NumPy mean over the adaptive-pooling bin [floor(i*H/G), ceil((i+1)*H/G)) of rows (and columns).
Tolerance: float32 sums in another order, rtol 1e-5 / atol 1e-6.
"""

from __future__ import annotations

import dataclasses
import math

import h5py
import numpy as np
import pytest
import torch

from butd.detector.config import ExtractionConfig, model_version
from butd.detector.extractor import Extractor
from butd.store.exporters import EXPORTERS
from butd.store.grid_export import export_h5_grid, grid_key
from butd.store.h5 import FeatureFile, FeatureFileError
from butd.store.h5_writer import FeatureFileWriter, write_feature_file
from butd.store.records import FeatureRecord, RecordError
from butd.workers.protocol import OnlineResult
from butd.workers.wire import decode_result, encode_result, stored_form
from tests.tiny_weights import random_detector

torch.set_num_threads(2)
G = 3
REGION_FIELDS = ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf")


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return random_detector(seed=11)


def images() -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    shapes = [(90, 120), (90, 120), (100, 70)]  # two share a batch, one is alone
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def extractor(model: torch.nn.Module, grid_size: int) -> Extractor:
    config = model.spec.default_extraction().replace(grid_size=grid_size)
    return Extractor(model, config=config, weights_sha256="e" * 64, batch_size=4)


def test_regions_are_the_same_bytes_with_grids(model: torch.nn.Module) -> None:
    plain = extractor(model, 0).extract(images(), ["a", "b", "c"])
    gridded = extractor(model, G).extract(images(), ["a", "b", "c"])
    for p, g in zip(plain, gridded, strict=True):
        assert p.grid is None and g.grid is not None
        for name in REGION_FIELDS:
            assert getattr(p, name).tobytes() == getattr(g, name).tobytes(), name
        assert p.model_version != g.model_version  # another cache key: records differ


def test_grid_equals_res5_over_res4_pooled_by_hand(model: torch.nn.Module) -> None:
    ext = extractor(model, G)
    image = images()[2]
    (rec,) = ext.extract([image], ["c"])
    from butd.detector.preprocess import prepare

    prepared = prepare(image, ext.config)
    with torch.no_grad():
        res5 = model.roi_heads.res5(model.backbone(prepared.tensor[None]))[0].numpy()  # (D,H,W)
    d, h, w = res5.shape
    want = np.zeros((G, G, d), np.float64)
    for i in range(G):
        r0, r1 = math.floor(i * h / G), math.ceil((i + 1) * h / G)
        for j in range(G):
            c0, c1 = math.floor(j * w / G), math.ceil((j + 1) * w / G)
            want[i, j] = res5[:, r0:r1, c0:c1].astype(np.float64).mean(axis=(1, 2))
    assert rec.grid is not None and rec.grid.shape == (G, G, d) and rec.grid.dtype == np.float32
    np.testing.assert_allclose(rec.grid, want, rtol=1e-5, atol=1e-6)


def test_grid_size_zero_keeps_the_existing_model_versions() -> None:
    config = ExtractionConfig()
    assert "grid_size" not in config.to_json()
    assert ExtractionConfig.from_json(config.to_json()) == config
    assert model_version("a" * 64, config) != model_version("a" * 64, config.replace(grid_size=7))
    with pytest.raises(ValueError, match="grid_size"):
        config.replace(grid_size=33)


def record(image_id: str, grid: np.ndarray | None, d: int = 4) -> FeatureRecord:
    rng = np.random.default_rng(len(image_id))
    n = 3
    return FeatureRecord(
        image_id=image_id,
        image_w=40,
        image_h=30,
        boxes=rng.uniform(0, 20, (n, 4)).astype(np.float32),
        features=rng.uniform(0, 1, (n, d)).astype(np.float32),
        objects_id=np.arange(n, dtype=np.int64),
        objects_conf=np.full(n, 0.5, np.float32),
        attrs_id=np.zeros(n, np.int64),
        attrs_conf=np.full(n, 0.25, np.float32),
        model_version="v",
        grid=grid,
    )


def test_record_checks_the_grid_shape() -> None:
    with pytest.raises(RecordError, match="grid"):
        record("x", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(RecordError, match="grid"):
        record("x", np.zeros((2, 2, 5), np.float32))


def test_h5_round_trip_and_h5_grid_export_read_as_consumers_do(tmp_path) -> None:
    rng = np.random.default_rng(0)
    recs = [record(f"{i}", rng.uniform(0, 1, (G, G, 4)).astype(np.float32)) for i in (7, 42)]
    path = tmp_path / "f.h5"
    write_feature_file(path, recs, model_version="v", feature_dim=4, grid_size=G)
    with FeatureFile(path) as ff:
        assert ff.grid_size == G and ff.writer_meta()["grid_size"] == G
        back = ff.get("42")
        assert back.grid is not None and back.grid.dtype == np.float16  # stored as features are
        np.testing.assert_allclose(back.grid, recs[1].grid, rtol=2.0**-11, atol=2.0**-24)
        out = tmp_path / "grids.h5"
        assert EXPORTERS["h5-grid"](ff, out) == 2
    with h5py.File(out, "r") as h5:  # RSTNet / DLCT style: f[f"{image_id}_grids"][()]
        cells = h5["7_grids"][()]
        assert cells.shape == (G * G, 4) and cells.dtype == np.float32
        assert int(h5.attrs["grid_size"]) == G
    flat = recs[0].grid.astype(np.float16).astype(np.float32).reshape(G * G, 4)
    np.testing.assert_array_equal(cells, flat)
    # row-major: cell (row 1, column 2) is row 1 * G + 2
    np.testing.assert_array_equal(cells[1 * G + 2], flat.reshape(G, G, 4)[1, 2])
    assert grid_key("7") == "7_grids"


def test_writer_refuses_grid_mismatches(tmp_path) -> None:
    grid = np.zeros((G, G, 4), np.float32)
    plain = FeatureFileWriter(tmp_path / "a.h5", model_version="v", feature_dim=4)
    with plain as w, pytest.raises(FeatureFileError, match="grid"):
        w.append([record("x", grid)])
    gridded = FeatureFileWriter(tmp_path / "b.h5", model_version="v", feature_dim=4, grid_size=G)
    with gridded as w, pytest.raises(FeatureFileError, match="grid"):
        w.append([record("x", None)])
    with pytest.raises(FeatureFileError, match="grid_size"):  # resuming with another G
        FeatureFileWriter(tmp_path / "b.h5", model_version="v", feature_dim=4, grid_size=2)
    write_feature_file(tmp_path / "c.h5", [record("x", None)], model_version="v", feature_dim=4)
    with FeatureFile(tmp_path / "c.h5") as ff, pytest.raises(FeatureFileError, match="grid-size"):
        export_h5_grid(ff, tmp_path / "none.h5")


def test_wire_carries_the_grid_in_stored_form() -> None:
    grid = np.random.default_rng(1).uniform(0, 1, (G, G, 4)).astype(np.float32)
    rec = stored_form(record("w", grid), "float16")
    assert rec.grid is not None and rec.grid.dtype == np.float16
    result = OnlineResult("r", "ok", "v", "0" * 64, num_boxes=3, record=rec)
    back = decode_result(encode_result(result)).record
    assert back is not None and back.grid is not None
    assert back.grid.tobytes() == rec.grid.tobytes() and back.features.tobytes() == (
        rec.features.tobytes()
    )
    plain = dataclasses.replace(result, record=stored_form(record("w", None), "float16"))
    decoded = decode_result(encode_result(plain)).record
    assert decoded is not None and decoded.grid is None
