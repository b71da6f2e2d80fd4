"""Anchor boxes: Caffe's ``generate_anchors.py``, detectron2's cell anchors, and the image grid.

Shape glossary:
    A       anchors per feature-map cell (12 = 3 ratios x 4 scales)
    H, W    feature-map height and width (cells)

Two orders exist (reference §1.3, §12.2): Caffe's is RATIO-major (a = ratio_idx * n_scales +
scale_idx), detectron2's is SIZE-major (a = size_idx * n_ratios + ratio_idx). Canonical
checkpoints use the ratio-major order; :func:`size_major_to_ratio_major` gives the permutation
converters apply to anchors and to the RPN's per-anchor channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _caffe_whctr(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """Width, height and centre of an inclusive-coordinate box (Caffe ``_whctrs``)."""
    w = box[2] - box[0] + 1
    h = box[3] - box[1] + 1
    return w, h, box[0] + 0.5 * (w - 1), box[1] + 0.5 * (h - 1)


def _caffe_box(w: float, h: float, cx: float, cy: float) -> tuple[float, float, float, float]:
    """Inclusive box of size w x h around (cx, cy) (Caffe ``_mkanchors``)."""
    return (cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1))


def caffe_cell_anchors(
    base_size: int = 16,
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    scales: Sequence[float] = (4, 8, 16, 32),
) -> torch.Tensor:
    """Anchors of one cell exactly as py-faster-rcnn ``generate_anchors`` makes them.

    The base box ``[0, 0, base-1, base-1]`` is reshaped to each ratio keeping its area, with
    ``round`` (half to even, as ``np.round``) on width and then height, and each result is
    scaled. Centre (base-1)/2 = 7.5 in inclusive coordinates.

    Args:
        base_size: side of the base box in pixels (the feature stride, 16).
        ratios: height / width ratios.
        scales: multipliers of the ratio boxes' sides.

    Returns:
        (A, 4) float32, A = len(ratios) * len(scales), ratio-major.
    """
    w, h, cx, cy = _caffe_whctr((0.0, 0.0, base_size - 1.0, base_size - 1.0))
    area = w * h
    anchors = []
    for ratio in ratios:
        rw = float(round(math.sqrt(area / ratio)))
        rh = float(round(rw * ratio))
        rcx, rcy = _caffe_whctr(_caffe_box(rw, rh, cx, cy))[2:]
        for scale in scales:
            anchors.append(_caffe_box(rw * scale, rh * scale, rcx, rcy))
    return torch.tensor(anchors, dtype=torch.float32)


def detectron2_cell_anchors(
    sizes: Sequence[float],
    ratios: Sequence[float] = (0.5, 1.0, 2.0),
    offset: float = 0.0,
    stride: int = 16,
) -> torch.Tensor:
    """Anchors of one cell as detectron2 ``DefaultAnchorGenerator`` makes them.

    ``w = sqrt(size^2 / ratio)``, ``h = ratio * w``, not rounded, centred at 0. detectron2 adds
    ``offset * stride`` to the grid shifts; here it is added to the cell anchors instead, so
    :func:`grid_anchors` reproduces the same boxes (bit-exact for the usual ``offset = 0``).

    Args:
        sizes: anchor side lengths in pixels for ratio 1 (airsplay: 64..512; MILVLG: 4..32).
        ratios: height / width ratios.
        offset: grid offset in units of ``stride`` (detectron2 ``ANCHOR_GENERATOR.OFFSET``).
        stride: feature stride in pixels, used only with a non-zero offset.

    Returns:
        (A, 4) float32, A = len(sizes) * len(ratios), size-major.
    """
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append((-w / 2.0, -h / 2.0, w / 2.0, h / 2.0))
    cell = torch.tensor(anchors, dtype=torch.float32)
    if offset:
        cell = cell + offset * stride
    return cell


def size_major_to_ratio_major(n_sizes: int, n_ratios: int) -> torch.Tensor:
    """Permutation ``perm`` with ``ratio_major = size_major[perm]``.

    Ratio-major index ``a = r * n_sizes + s`` takes size-major index ``s * n_ratios + r``. Apply
    it to cell anchors (rows) and to per-anchor channel blocks of the RPN heads.

    Returns:
        (n_sizes * n_ratios,) int64.
    """
    r = torch.arange(n_ratios).repeat_interleave(n_sizes)  # ratio index of each output slot
    s = torch.arange(n_sizes).repeat(n_ratios)  # size index of each output slot
    return s * n_ratios + r


def grid_anchors(cell: torch.Tensor, feat_h: int, feat_w: int, stride: int) -> torch.Tensor:
    """Anchors of every feature-map cell, Caffe ``proposal_layer`` / detectron2 order.

    Args:
        cell: (A, 4) float32 anchors around the origin cell.
        feat_h: feature-map height H.
        feat_w: feature-map width W.
        stride: pixels per cell; shifts are ``arange(W) * stride`` and ``arange(H) * stride``.

    Returns:
        (H * W * A, 4) float32, rows ordered (h, w, a), on ``cell``'s device.
    """
    dev = cell.device
    sx = torch.arange(feat_w, device=dev, dtype=torch.float32) * stride
    sy = torch.arange(feat_h, device=dev, dtype=torch.float32) * stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")  # (H, W) each
    shifts = torch.stack((xx, yy, xx, yy), dim=-1).reshape(-1, 1, 4)  # (H*W, 1, 4)
    return (shifts + cell.to(torch.float32).reshape(1, -1, 4)).reshape(-1, 4)
