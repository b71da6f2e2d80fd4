"""Training targets: anchor labels for the RPN and sampled RoIs for the Fast R-CNN head.

py-faster-rcnn's ``anchor_target_layer.py`` and ``proposal_target_layer.py`` as functions, in
the +1 box convention the weights are tested under (``Conventions.plus_one``).

Shape glossary:
    M   anchors of one image (Hf * Wf * A, rows ordered (h, w, a))
    G   ground-truth objects of one image
    P   proposals of one image
    R   sampled RoIs of one image (fg first, then bg)
    Na  max attributes per object (padded with -1)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from butd.detector.boxes import box_iou, encode_boxes


@dataclass(frozen=True)
class AnchorTargets:
    """RPN targets of one image.

    Attributes:
        labels: (M,) int64, 1 foreground, 0 background, -1 ignored (not sampled / outside).
        deltas: (M, 4) float32 regression targets (rows of non-foreground anchors are 0).
    """

    labels: torch.Tensor
    deltas: torch.Tensor


@dataclass(frozen=True)
class RoITargets:
    """Sampled RoIs of one image and their targets.

    Attributes:
        rois: (R, 4) float32 boxes in resized-image pixels, foreground first.
        labels: (R,) int64 class in [0, K] (0 = background).
        deltas: (R, 4) float32 regression targets toward the matched ground truth (raw, not
            normalised; 0 for background).
        gt_index: (R,) int64 matched ground-truth object (meaningful for foreground rows).
        num_fg: number of foreground rows (the first ``num_fg``).
    """

    rois: torch.Tensor
    labels: torch.Tensor
    deltas: torch.Tensor
    gt_index: torch.Tensor
    num_fg: int


def _subsample(mask: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of at most ``limit`` True entries of ``mask``, chosen uniformly."""
    index = torch.nonzero(mask).flatten()
    if index.numel() > limit:
        perm = torch.randperm(index.numel(), generator=generator)[:limit]
        index = index[perm]
    return index


def _label_anchors(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    image_size: tuple[int, int],
    pos_iou: float,
    neg_iou: float,
    border: float,
    plus_one: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels (M,) in {-1, 0, 1} before subsampling and deltas (M, 4) of foreground anchors."""
    h, w = image_size
    m = anchors.shape[0]
    labels = torch.full((m,), -1, dtype=torch.int64)
    deltas = torch.zeros((m, 4), dtype=torch.float32)
    inside = (
        (anchors[:, 0] >= -border)
        & (anchors[:, 1] >= -border)
        & (anchors[:, 2] < w + border)
        & (anchors[:, 3] < h + border)
    )
    if gt_boxes.shape[0] == 0:
        labels[inside] = 0
        return labels, deltas
    iou = box_iou(anchors, gt_boxes, plus_one=plus_one)  # (M, G)
    iou[~inside] = -1.0
    max_iou, argmax = iou.max(dim=1)
    labels[inside & (max_iou < neg_iou)] = 0
    gt_best = iou.max(dim=0).values  # (G,)
    is_best = ((iou == gt_best[None, :]) & (gt_best[None, :] > 0)).any(dim=1)
    labels[inside & (is_best | (max_iou >= pos_iou))] = 1
    fg = labels == 1
    deltas[fg] = encode_boxes(anchors[fg], gt_boxes[argmax[fg]], plus_one=plus_one)
    return labels, deltas


def anchor_targets(
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    image_size: tuple[int, int],
    *,
    batch_size: int,
    fg_fraction: float,
    pos_iou: float,
    neg_iou: float,
    allowed_border: float,
    plus_one: bool,
    generator: torch.Generator,
) -> AnchorTargets:
    """Labels and regression targets of every anchor (anchor_target_layer.py).

    Anchors crossing the image border by more than ``allowed_border`` are ignored. Background:
    max IoU < ``neg_iou``; foreground: max IoU >= ``pos_iou``, or the (tied) best anchor of some
    ground truth (positives win over negatives). Then at most ``fg_fraction * batch_size``
    foreground and ``batch_size - #fg`` background anchors are kept, the rest set to -1.

    Args:
        anchors: (M, 4) float32 in resized-image pixels.
        gt_boxes: (G, 4) float32, G >= 0.
        image_size: resized (H, W).
        batch_size, fg_fraction, pos_iou, neg_iou, allowed_border: see ``TrainConfig``.
        plus_one: box convention of IoU and deltas.
        generator: random source of the subsampling.

    Returns:
        AnchorTargets with (M,) labels and (M, 4) deltas.
    """
    labels, deltas = _label_anchors(
        anchors, gt_boxes, image_size, pos_iou, neg_iou, allowed_border, plus_one
    )
    m = anchors.shape[0]
    keep_fg = _subsample(labels == 1, int(fg_fraction * batch_size), generator)
    keep_bg = _subsample(labels == 0, batch_size - keep_fg.numel(), generator)
    sampled = torch.full((m,), -1, dtype=torch.int64)
    sampled[keep_fg] = 1
    sampled[keep_bg] = 0
    deltas[sampled != 1] = 0.0
    return AnchorTargets(sampled, deltas)


def sample_rois(
    proposals: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_classes: torch.Tensor,
    *,
    batch_size: int,
    fg_fraction: float,
    fg_iou: float,
    bg_iou_hi: float,
    bg_iou_lo: float,
    plus_one: bool,
    generator: torch.Generator,
) -> RoITargets:
    """Foreground / background RoIs and their targets (proposal_target_layer.py).

    The ground-truth boxes join the proposals. Foreground: max IoU >= ``fg_iou`` (at most
    ``round(fg_fraction * batch_size)``); background: max IoU in [``bg_iou_lo``, ``bg_iou_hi``)
    filling the rest of ``batch_size``.

    Args:
        proposals: (P, 4) float32 resized-image pixels.
        gt_boxes: (G, 4) float32, G >= 1.
        gt_classes: (G,) int64 in [1, K] (background is 0).
        batch_size, fg_fraction, fg_iou, bg_iou_hi, bg_iou_lo: see ``TrainConfig``.
        plus_one: box convention.
        generator: random source of the sampling.

    Returns:
        RoITargets with R <= batch_size rows, foreground first.
    """
    if gt_boxes.shape[0] == 0:
        raise ValueError("sample_rois needs at least one ground-truth box")
    boxes = torch.cat([proposals.to(torch.float32), gt_boxes.to(torch.float32)])
    iou = box_iou(boxes, gt_boxes, plus_one=plus_one)  # (P+G, G)
    max_iou, argmax = iou.max(dim=1)
    fg = _subsample(max_iou >= fg_iou, round(fg_fraction * batch_size), generator)
    bg_mask = (max_iou < bg_iou_hi) & (max_iou >= bg_iou_lo)
    bg = _subsample(bg_mask, batch_size - fg.numel(), generator)
    keep = torch.cat([fg, bg])
    rois = boxes[keep]
    labels = gt_classes[argmax[keep]].clone()
    labels[fg.numel() :] = 0
    deltas = torch.zeros((keep.numel(), 4), dtype=torch.float32)
    if fg.numel():
        deltas[: fg.numel()] = encode_boxes(
            rois[: fg.numel()], gt_boxes[argmax[fg]], plus_one=plus_one
        )
    return RoITargets(rois, labels, deltas, argmax[keep], int(fg.numel()))


def attribute_labels(
    gt_attributes: torch.Tensor,
    gt_index: torch.Tensor,
    *,
    sampling: str,
    generator: torch.Generator,
) -> torch.Tensor:
    """One attribute target per foreground RoI, as logit indices (attribute id + 1).

    Args:
        gt_attributes: (G, Na) int64 0-based attribute ids of each object, padded with -1.
        gt_index: (F,) matched object of each foreground RoI.
        sampling: "first" (the object's first attribute) or "random" (uniform among them).
        generator: random source for "random".

    Returns:
        (F,) int64 in [1, At] or -1 (ignored: the object has no attribute).
    """
    attrs = gt_attributes[gt_index]  # (F, Na)
    count = (attrs >= 0).sum(dim=1)  # (F,)
    if sampling == "first":
        pick = torch.zeros_like(count)
    elif sampling == "random":
        u = torch.rand(count.shape, generator=generator)
        pick = torch.minimum((u * count).long(), (count - 1).clamp(min=0))
    else:
        raise ValueError(f"attr_sampling must be 'first' or 'random'; got {sampling!r}")
    if attrs.shape[1] == 0:
        return torch.full_like(count, -1)
    chosen = attrs.gather(1, pick[:, None]).squeeze(1)
    return torch.where(count > 0, chosen + 1, torch.full_like(chosen, -1))
