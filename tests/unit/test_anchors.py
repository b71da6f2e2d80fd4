"""Anchors against the reference table (§1.3), detectron2's formula (§12.2) and explicit loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from butd.detector.anchors import (
    caffe_cell_anchors,
    detectron2_cell_anchors,
    grid_anchors,
    size_major_to_ratio_major,
)

# butd-reference.md §1.3: generate_anchors(16, [0.5, 1, 2], [4, 8, 16, 32]).
CAFFE_TABLE = [
    [-38, -16, 53, 31], [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-24, -24, 39, 39], [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-14, -36, 29, 51], [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]  # fmt: skip


def _numpy_generate_anchors(base_size, ratios, scales) -> np.ndarray:
    """Vectorised NumPy reimplementation of the generate_anchors rule (np.round, ratio-major)."""
    ratios = np.asarray(ratios, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    w = h = float(base_size)
    ctr = 0.5 * (base_size - 1)
    ws = np.round(np.sqrt(w * h / ratios))
    hs = np.round(ws * ratios)
    all_w = (ws[:, None] * scales[None, :]).ravel()
    all_h = (hs[:, None] * scales[None, :]).ravel()
    return np.stack(
        [ctr - 0.5 * (all_w - 1), ctr - 0.5 * (all_h - 1), ctr + 0.5 * (all_w - 1),
         ctr + 0.5 * (all_h - 1)],
        axis=1,
    )  # fmt: skip


def test_caffe_anchors_equal_reference_table() -> None:
    anchors = caffe_cell_anchors()
    assert anchors.dtype == torch.float32 and anchors.shape == (12, 4)
    assert anchors.tolist() == CAFFE_TABLE


@pytest.mark.parametrize(
    ("base", "ratios", "scales"),
    [(16, (0.5, 1, 2), (8, 16, 32)), (16, (0.25, 0.5, 1, 2, 4), (2, 4)), (8, (0.7, 1.3), (3, 5))],
)
def test_caffe_anchors_equal_numpy_port(base, ratios, scales) -> None:
    got = caffe_cell_anchors(base, ratios, scales).numpy()
    np.testing.assert_array_equal(got, _numpy_generate_anchors(base, ratios, scales))


def test_detectron2_anchors_formula_and_order() -> None:
    sizes, ratios = (64, 128, 256, 512), (0.5, 1.0, 2.0)
    anchors = detectron2_cell_anchors(sizes, ratios)
    assert anchors.shape == (12, 4)
    for a, (size, ratio) in enumerate((s, r) for s in sizes for r in ratios):  # size-major
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        want = torch.tensor([-w / 2, -h / 2, w / 2, h / 2], dtype=torch.float32)
        assert torch.equal(anchors[a], want)
    # §12.2: 90.51 x 45.25 first, 362 x 724 last, centred at 0.
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    assert widths[0].item() == pytest.approx(90.51, abs=0.01)
    assert heights[0].item() == pytest.approx(45.25, abs=0.01)
    assert (widths[-1].item(), heights[-1].item()) == pytest.approx((362.04, 724.08), abs=0.01)
    assert torch.equal(anchors[:, :2], -anchors[:, 2:])


def test_detectron2_offset_moves_cells() -> None:
    plain = detectron2_cell_anchors((32,), (1.0,))
    shifted = detectron2_cell_anchors((32,), (1.0,), offset=0.5, stride=16)
    assert torch.equal(shifted - plain, torch.full((1, 4), 8.0))


def test_size_major_to_ratio_major_permutation() -> None:
    sizes, ratios = (4, 8, 16, 32), (0.5, 1.0, 2.0)
    perm = size_major_to_ratio_major(len(sizes), len(ratios))
    assert perm.dtype == torch.int64
    assert sorted(perm.tolist()) == list(range(12))
    moved = detectron2_cell_anchors(sizes, ratios)[perm]
    for a in range(12):
        r, s = divmod(a, len(sizes))  # ratio-major slot
        assert torch.equal(moved[a], detectron2_cell_anchors((sizes[s],), (ratios[r],))[0])
    # Same order as Caffe: aspect ratio constant within each block of four.
    caffe = caffe_cell_anchors()
    caffe_ratio = (caffe[:, 3] - caffe[:, 1] + 1) / (caffe[:, 2] - caffe[:, 0] + 1)
    d2_ratio = (moved[:, 3] - moved[:, 1]) / (moved[:, 2] - moved[:, 0])
    assert torch.equal(
        torch.argsort(caffe_ratio, stable=True), torch.argsort(d2_ratio, stable=True)
    )


def test_grid_anchors_row_order() -> None:
    cell = caffe_cell_anchors()
    feat_h, feat_w, stride = 3, 5, 16
    grid = grid_anchors(cell, feat_h, feat_w, stride)
    assert grid.shape == (feat_h * feat_w * 12, 4)
    rows = []
    for y in range(feat_h):
        for x in range(feat_w):
            for a in range(12):
                rows.append(
                    [v + s for v, s in zip(CAFFE_TABLE[a], (x * 16, y * 16) * 2, strict=True)]
                )
    assert grid.tolist() == rows
