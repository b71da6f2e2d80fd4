"""Box math as pure torch functions: decode/encode, clip, area, IoU, size filter, exact NMS.

Shape glossary:
    R, S    numbers of boxes
    k       boxes per row in class-specific layouts (deltas (R, 4k): class j at columns 4j..4j+3)
    n       boxes in rank order inside one greedy-suppression problem

Every box is ``x1, y1, x2, y2`` float32. ``plus_one`` selects the legacy py-faster-rcnn
convention (width = x2 - x1 + 1, clipping to [0, W-1]); without it the detectron2/torchvision
convention holds (width = x2 - x1, clipping to [0, W]). Reference §1.3, §2.3, §14.

Arithmetic follows the reference implementations operation by operation in float32 (Caffe's
NumPy/Cython code and detectron2 both run in float32), so IoU values and thresholds agree bit for
bit. Thresholds are Python floats compared in double precision by ``cpu_nms.pyx`` and
torchvision; :func:`float32_threshold` turns such a threshold into a float32 value that makes a
float32 comparison give the same answer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torchvision

logger = logging.getLogger(__name__)

# Sorted boxes handled per step by the blocked exact NMS: bounds the pairwise matrices to
# block x (kept + block) booleans, and lets ``max_output`` stop early (RPN keeps 300 of 6000).
_NMS_BLOCK = 512


def _split(boxes: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(..., 4k) -> four (..., k) views x1, y1, x2, y2."""
    return boxes[..., 0::4], boxes[..., 1::4], boxes[..., 2::4], boxes[..., 3::4]


def _widths_heights(boxes: torch.Tensor, plus_one: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Widths and heights of (R, 4k) boxes, each (R, k), as the references compute them."""
    x1, y1, x2, y2 = _split(boxes)
    if plus_one:
        return x2 - x1 + 1.0, y2 - y1 + 1.0
    return x2 - x1, y2 - y1


def decode_boxes(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    *,
    plus_one: bool,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    clamp: float | None = None,
) -> torch.Tensor:
    """Apply regression deltas to reference boxes.

    ``plus_one``: Caffe ``bbox_transform_inv``; otherwise detectron2 ``Box2BoxTransform``. Both
    compute ``ctr = x1 + 0.5 w``, ``ctr' = dx w + ctr``, ``w' = exp(dw) w``,
    ``x1' = ctr' - 0.5 w'``, ``x2' = ctr' + 0.5 w'`` (no -1 on x2' in either).

    Args:
        anchors: (R, 4) float32 reference boxes (anchors or proposals).
        deltas: (R, 4k) float32, (dx, dy, dw, dh) per box and class.
        plus_one: legacy width convention (w = x2 - x1 + 1).
        weights: (wx, wy, ww, wh) dividing the deltas (Caffe snapshots: 1; detectron2 heads:
            10, 10, 5, 5).
        clamp: upper bound on dw/dh after division (detectron2: log(1000/16)); None = no clamp.

    Returns:
        (R, 4k) float32 decoded boxes.
    """
    anchors = anchors.to(deltas.dtype)
    widths, heights = _widths_heights(anchors, plus_one)  # (R, 1) each
    ctr_x = anchors[:, 0:1] + 0.5 * widths
    ctr_y = anchors[:, 1:2] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy, dw, dh = _split(deltas)
    dx, dy, dw, dh = dx / wx, dy / wy, dw / ww, dh / wh
    if clamp is not None:
        dw = torch.clamp(dw, max=clamp)
        dh = torch.clamp(dh, max=clamp)
    pred_ctr_x = dx * widths + ctr_x
    pred_ctr_y = dy * heights + ctr_y
    pred_w = torch.exp(dw) * widths
    pred_h = torch.exp(dh) * heights
    out = torch.stack(
        (
            pred_ctr_x - 0.5 * pred_w,
            pred_ctr_y - 0.5 * pred_h,
            pred_ctr_x + 0.5 * pred_w,
            pred_ctr_y + 0.5 * pred_h,
        ),
        dim=-1,
    )  # (R, k, 4)
    return out.reshape(deltas.shape)


def encode_boxes(
    anchors: torch.Tensor,
    targets: torch.Tensor,
    *,
    plus_one: bool,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
) -> torch.Tensor:
    """Regression targets turning ``anchors`` into ``targets`` (inverse of :func:`decode_boxes`).

    Caffe ``bbox_transform`` when ``plus_one``, detectron2 ``Box2BoxTransform.get_deltas``
    otherwise: ``dx = wx (ctr_t - ctr_a) / w_a``, ``dw = ww log(w_t / w_a)``.

    Args:
        anchors: (R, 4) float32 source boxes.
        targets: (R, 4) float32 target boxes.
        plus_one: legacy width convention.
        weights: (wx, wy, ww, wh) multiplying the deltas.

    Returns:
        (R, 4) float32 deltas (dx, dy, dw, dh).
    """
    anchors = anchors.to(targets.dtype)
    aw, ah = _widths_heights(anchors, plus_one)
    tw, th = _widths_heights(targets, plus_one)
    a_cx, a_cy = anchors[:, 0:1] + 0.5 * aw, anchors[:, 1:2] + 0.5 * ah
    t_cx, t_cy = targets[:, 0:1] + 0.5 * tw, targets[:, 1:2] + 0.5 * th
    wx, wy, ww, wh = weights
    deltas = torch.cat(
        (
            wx * (t_cx - a_cx) / aw,
            wy * (t_cy - a_cy) / ah,
            ww * torch.log(tw / aw),
            wh * torch.log(th / ah),
        ),
        dim=1,
    )
    return deltas


def clip_boxes(boxes: torch.Tensor, height: float, width: float, *, plus_one: bool) -> torch.Tensor:
    """Clip (R, 4k) boxes to the image: [0, W-1] x [0, H-1] if ``plus_one`` else [0, W] x [0, H].

    Args:
        boxes: (R, 4k) float32.
        height: image height in pixels (of the frame the boxes live in).
        width: image width in pixels.
        plus_one: legacy convention (Caffe ``clip_boxes``).

    Returns:
        (R, 4k) float32, a new tensor.
    """
    x_max = float(width) - 1.0 if plus_one else float(width)
    y_max = float(height) - 1.0 if plus_one else float(height)
    out = boxes.clone()
    out[..., 0::4] = boxes[..., 0::4].clamp(max=x_max).clamp(min=0.0)
    out[..., 1::4] = boxes[..., 1::4].clamp(max=y_max).clamp(min=0.0)
    out[..., 2::4] = boxes[..., 2::4].clamp(max=x_max).clamp(min=0.0)
    out[..., 3::4] = boxes[..., 3::4].clamp(max=y_max).clamp(min=0.0)
    return out


def box_area(boxes: torch.Tensor, *, plus_one: bool) -> torch.Tensor:
    """Areas of (R, 4) boxes -> (R,) float32; ``(x2-x1+1)(y2-y1+1)`` when ``plus_one``."""
    w, h = _widths_heights(boxes, plus_one)
    return (w * h)[:, 0]


def box_iou(a: torch.Tensor, b: torch.Tensor, *, plus_one: bool) -> torch.Tensor:
    """Pairwise IoU, computed in the order of ``cpu_nms.pyx`` / torchvision (float32).

    ``inter / ((area_a + area_b) - inter)``; a 0/0 (two empty boxes) gives NaN, which no
    threshold comparison accepts, exactly as in the reference loops.

    Args:
        a: (R, 4) float32.
        b: (S, 4) float32.
        plus_one: legacy convention (+1 in areas and intersection sides).

    Returns:
        (R, S) float32.
    """
    area_a = box_area(a, plus_one=plus_one)
    area_b = box_area(b, plus_one=plus_one)
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])  # (R, S, 2)
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])  # (R, S, 2)
    side = rb - lt + 1.0 if plus_one else rb - lt
    side = side.clamp(min=0.0)
    inter = side[..., 0] * side[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def float32_threshold(thresh: float, *, inclusive: bool) -> float:
    """A float32 value ``t`` such that float32 comparisons reproduce double ones.

    For a float32 ``x``: ``x >= thresh`` (double) iff ``x >= t`` when ``inclusive`` (``t`` = the
    smallest float32 >= thresh), and ``x > thresh`` iff ``x > t`` otherwise (``t`` = the largest
    float32 <= thresh). torch compares a float32 tensor with a Python float in float32.
    """
    t = np.float32(thresh)
    if inclusive and float(t) < thresh:
        t = np.nextafter(t, np.float32(np.inf))
    elif not inclusive and float(t) > thresh:
        t = np.nextafter(t, np.float32(-np.inf))
    return float(t)


def suppression_matrix(
    a: torch.Tensor, b: torch.Tensor, thresh: float, *, plus_one: bool, suppress_equal: bool
) -> torch.Tensor:
    """(R, S) bool: box ``a[i]`` suppresses ``b[j]`` if kept before it (IoU >= or > thresh)."""
    iou = box_iou(a, b, plus_one=plus_one)
    t = float32_threshold(thresh, inclusive=suppress_equal)
    return iou >= t if suppress_equal else iou > t


def greedy_keep(suppress: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy NMS on boxes already in rank order, batched over leading dimensions.

    The greedy result is the unique solution of ``keep[j] = candidates[j] and not any_i(keep[i]
    and suppress[i, j])`` for ``suppress`` strictly upper triangular (only earlier ranks
    suppress). Iterating that map from ``candidates`` fixes one more rank per step at least, so it
    reaches the solution in at most n steps, in practice in (longest suppression chain + 1).

    Args:
        suppress: (..., n, n) bool, ``[i, j]`` = rank i would suppress rank j (upper triangular).
        candidates: (..., n) bool, boxes that take part (False = already suppressed).

    Returns:
        (..., n) bool kept mask.
    """
    n = suppress.shape[-1]
    if n == 0:
        return candidates.clone()
    weight = suppress.to(torch.float32)  # counts of kept suppressors stay exact in float32
    keep = candidates.clone()
    for _ in range(n + 1):
        hits = torch.matmul(keep.to(torch.float32).unsqueeze(-2), weight).squeeze(-2)
        new_keep = candidates & (hits == 0)
        if torch.equal(new_keep, keep):
            return keep
        keep = new_keep
    raise AssertionError("greedy suppression did not converge")  # unreachable by the argument


def stable_descending(scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorting ``scores`` descending along ``dim``; ties keep the lower index first."""
    return torch.sort(scores, dim=dim, descending=True, stable=True).indices


def nms(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    thresh: float,
    *,
    plus_one: bool,
    suppress_equal: bool,
    max_output: int | None = None,
) -> torch.Tensor:
    """Exact greedy non-maximum suppression (same result as the sequential loop).

    Boxes are visited by score descending, ties by lower index first; a visited box that is not
    suppressed is kept and suppresses every later box whose IoU with it is ``>= thresh``
    (``suppress_equal``, Caffe ``cpu_nms``) or ``> thresh`` (torchvision). The modern flavour
    (no +1, ``>``) runs torchvision's kernel on boxes pre-sorted by this tie rule; the legacy
    flavours run a blocked matrix formulation (:func:`greedy_keep`) on any device.

    Args:
        boxes: (R, 4) float32.
        scores: (R,) float32.
        thresh: IoU threshold (a double, compared as the references do).
        plus_one: legacy +1 areas.
        suppress_equal: suppress at IoU == thresh too.
        max_output: stop once this many boxes are kept (the result is the greedy prefix).

    Returns:
        (N,) int64 kept indices into ``boxes``, in visiting order.
    """
    order = stable_descending(scores)
    sorted_boxes = boxes[order].to(torch.float32)
    if not plus_one and not suppress_equal:
        ranks = torch.arange(len(order), 0, -1, device=boxes.device, dtype=torch.float32)
        t = float32_threshold(thresh, inclusive=False)
        kept = torchvision.ops.nms(sorted_boxes, ranks, t)
    else:
        kept = _blocked_nms(sorted_boxes, thresh, plus_one, suppress_equal, max_output)
    if max_output is not None:
        kept = kept[:max_output]
    return order[kept]


def _blocked_nms(
    boxes: torch.Tensor, thresh: float, plus_one: bool, suppress_equal: bool, limit: int | None
) -> torch.Tensor:
    """Greedy NMS of (n, 4) boxes in rank order, one block of ranks at a time -> kept ranks."""
    kept = torch.zeros(0, dtype=torch.int64, device=boxes.device)
    n = boxes.shape[0]
    for start in range(0, n, _NMS_BLOCK):
        block = boxes[start : start + _NMS_BLOCK]
        candidates = torch.ones(block.shape[0], dtype=torch.bool, device=boxes.device)
        if kept.numel():
            by_kept = suppression_matrix(
                boxes[kept], block, thresh, plus_one=plus_one, suppress_equal=suppress_equal
            )
            candidates &= ~by_kept.any(dim=0)
        inner = suppression_matrix(
            block, block, thresh, plus_one=plus_one, suppress_equal=suppress_equal
        )
        inner = torch.triu(inner, diagonal=1)
        keep = greedy_keep(inner, candidates)
        kept = torch.cat((kept, start + torch.nonzero(keep).flatten()))
        if limit is not None and kept.numel() >= limit:
            break
    return kept


def keep_min_size(
    boxes: torch.Tensor, min_size: float, *, plus_one: bool, inclusive: bool
) -> torch.Tensor:
    """Indices of boxes whose width and height both reach ``min_size``.

    Caffe ``_filter_boxes``: ``w + 1 >= min`` (``plus_one``, ``inclusive``); MILVLG: ``>``;
    detectron2 ``nonempty``: ``w > 0`` (no +1, not inclusive). Sides are float32 as in the
    references, compared with ``min_size`` in double precision.

    Args:
        boxes: (R, 4) float32.
        min_size: minimum side in pixels.
        plus_one: side = x2 - x1 + 1.
        inclusive: keep a side equal to ``min_size``.

    Returns:
        (N,) int64 ascending indices.
    """
    w, h = _widths_heights(boxes, plus_one)
    w, h = w[:, 0].to(torch.float64), h[:, 0].to(torch.float64)
    ok = (w >= min_size) & (h >= min_size) if inclusive else (w > min_size) & (h > min_size)
    return torch.nonzero(ok).flatten()
