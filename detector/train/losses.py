"""Faster R-CNN losses as in the Caffe train.prototxt (RPN, Fast R-CNN, attributes).

Shape glossary:
    A   anchors per cell
    Hf,Wf  res4 map size
    M   Hf * Wf * A anchors, rows ordered (h, w, a)
    R   sampled RoIs of one image
    K   object classes (K+1 logits, background 0)
    F   foreground RoIs (the first F of R)
    At  attributes (At+1 logits, no-attribute 0)

* RPN objectness: "softmax2" = 2-way softmax cross-entropy over the (background, foreground)
  channel pair of each anchor (Caffe rpn_loss_cls); "sigmoid" = binary cross-entropy on A
  logits. Mean over the sampled anchors (labels >= 0).
* RPN boxes: smooth L1 with sigma 3 on foreground anchors, summed and divided by the number of
  sampled anchors (RPN_POSITIVE_WEIGHT -1: uniform outside weights 1 / #sampled).
* Classes: softmax cross-entropy over K+1, mean over the RoIs.
* Boxes: smooth L1 with sigma 1 on the 4 columns of each foreground RoI's class, summed and
  divided by R (Caffe SmoothL1Loss normalises by the batch).
* Attributes: softmax cross-entropy over At+1 on foreground RoIs whose object has an attribute
  (ignore label -1, mean over the valid ones: ``normalization: VALID``), weight 0.5 applied by
  the caller.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F


def smooth_l1(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Caffe's smooth L1: 0.5 (sigma x)^2 if |x| < 1 / sigma^2, else |x| - 0.5 / sigma^2."""
    s2 = sigma * sigma
    ax = x.abs()
    return torch.where(ax < 1.0 / s2, 0.5 * s2 * x * x, ax - 0.5 / s2)


def rpn_logits_per_anchor(objectness: torch.Tensor, num_anchors: int, layout: str) -> torch.Tensor:
    """Objectness map of one image -> per-anchor logits.

    Args:
        objectness: (2A, Hf, Wf) for "softmax2" (background block [0, A), foreground [A, 2A)),
            or (A, Hf, Wf) for "sigmoid".
        num_anchors: A.
        layout: "softmax2" or "sigmoid".

    Returns:
        (M, 2) [background, foreground] logits, or (M,) foreground logits, rows (h, w, a).
    """
    _, hf, wf = objectness.shape
    if layout == "softmax2":
        pairs = objectness.view(2, num_anchors, hf, wf).permute(2, 3, 1, 0)  # (Hf, Wf, A, 2)
        return pairs.reshape(-1, 2)
    if layout == "sigmoid":
        return objectness.permute(1, 2, 0).reshape(-1)
    raise ValueError(f"rpn_score must be 'softmax2' or 'sigmoid'; got {layout!r}")


def rpn_deltas_per_anchor(deltas: torch.Tensor) -> torch.Tensor:
    """(4A, Hf, Wf) with channel a*4 + (dx, dy, dw, dh) -> (M, 4), rows (h, w, a)."""
    return deltas.permute(1, 2, 0).reshape(-1, 4)


def rpn_losses(
    objectness: torch.Tensor,
    deltas: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_anchors: int,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(objectness loss, box loss) of one image.

    Args:
        objectness: (2A or A, Hf, Wf) raw map.
        deltas: (4A, Hf, Wf) raw map.
        labels: (M,) int64 in {-1, 0, 1}.
        targets: (M, 4) float32 regression targets.
        num_anchors: A.
        layout: "softmax2" or "sigmoid".
    """
    logits = rpn_logits_per_anchor(objectness, num_anchors, layout)
    sampled = labels >= 0
    n = sampled.sum().clamp(min=1)
    if layout == "softmax2":
        cls = F.cross_entropy(logits[sampled], labels[sampled], reduction="sum") / n
    else:
        cls = (
            F.binary_cross_entropy_with_logits(
                logits[sampled], labels[sampled].to(logits.dtype), reduction="sum"
            )
            / n
        )
    fg = labels == 1
    pred = rpn_deltas_per_anchor(deltas)
    box = smooth_l1(pred[fg] - targets[fg], sigma=3.0).sum() / n
    return cls, box


def fast_rcnn_losses(
    cls_logits: torch.Tensor,
    box_deltas: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(classification loss, box loss) of the sampled RoIs.

    Args:
        cls_logits: (R, K+1).
        box_deltas: (R, (K+1)*4) class-specific deltas in the space of ``targets``.
        labels: (R,) int64 in [0, K].
        targets: (R, 4) regression targets toward each RoI's ground truth (same space).
    """
    r = max(int(labels.shape[0]), 1)
    cls = F.cross_entropy(cls_logits, labels, reduction="sum") / r
    fg = torch.nonzero(labels > 0).flatten()
    cols = labels[fg, None] * 4 + torch.arange(4, device=labels.device)[None, :]  # (F, 4)
    pred = box_deltas[fg[:, None], cols]  # (F, 4)
    box = smooth_l1(pred - targets[fg], sigma=1.0).sum() / r
    return cls, box


def attribute_loss(attr_logits: torch.Tensor, attr_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over At+1 on the valid rows (label >= 0); 0 when none is valid.

    Args:
        attr_logits: (F, At+1).
        attr_labels: (F,) int64 in [1, At] or -1.
    """
    valid = attr_labels >= 0
    if not bool(valid.any()):
        return attr_logits.sum() * 0.0
    return F.cross_entropy(attr_logits[valid], attr_labels[valid])
