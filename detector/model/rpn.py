"""Region proposal network (reference §1.3, §2.3, §14 step 5).

Shape glossary:
    B   images in a batch (one resized shape)
    A   anchors per cell (12)
    Hf,Wf  res4 map size (stride 16)
    M   Hf * Wf * A candidate boxes of one image, rows ordered (h, w, a)
    P   proposals kept for one image (<= post-NMS top-k, 300)

The conventions that differ between weight files (anchor set, +1 box rule, NMS flavour, score
layout, clip/top-k order, minimum size) come from ``Conventions``, stored with the weights.
:func:`propose` is the one proposal layer: inference runs it with ``ProposalSettings`` built from
those conventions, training (``butd.detector.train.step``) with its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from butd.detector.anchors import grid_anchors
from butd.detector.boxes import clip_boxes, decode_boxes, keep_min_size, nms
from butd.detector.config import ArchConfig, Conventions, ExtractionConfig


class RPN(nn.Module):
    """3x3 conv + ReLU, then per-anchor objectness and box deltas; proposals at test time."""

    def __init__(self, arch: ArchConfig, conventions: Conventions) -> None:
        super().__init__()
        a = arch.num_anchors
        self.conventions = conventions
        self.feature_stride = arch.feature_stride
        score_channels = 2 * a if conventions.rpn_score == "softmax2" else a
        self.conv = nn.Conv2d(arch.res4_channels, arch.rpn_channels, 3, padding=1)
        self.objectness = nn.Conv2d(arch.rpn_channels, score_channels, 1)
        self.deltas = nn.Conv2d(arch.rpn_channels, 4 * a, 1)
        # Cell anchors (A, 4), ratio-major; replaced by the checkpoint's own.
        self.register_buffer("cell_anchors", torch.zeros(a, 4))

    def head(self, res4: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw maps for training and inference.

        res4 (B, C4, Hf, Wf) -> objectness (B, 2A or A, Hf, Wf), deltas (B, 4A, Hf, Wf).
        """
        hidden = F.relu(self.conv(res4))
        return self.objectness(hidden), self.deltas(hidden)

    def foreground_scores(self, objectness: torch.Tensor) -> torch.Tensor:
        """(B, 2A or A, Hf, Wf) -> (B, M) foreground probability, rows ordered (h, w, a)."""
        b, _, hf, wf = objectness.shape
        a = self.cell_anchors.shape[0]
        if self.conventions.rpn_score == "softmax2":
            # Caffe: reshape to (B, 2, A*Hf, Wf), softmax over the pair, take the fg block.
            fg = objectness.view(b, 2, a, hf, wf).softmax(dim=1)[:, 1]
        else:
            fg = objectness.sigmoid()
        return fg.permute(0, 2, 3, 1).reshape(b, -1)

    def flat_outputs(
        self, objectness: torch.Tensor, deltas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Head maps -> per-anchor rows ordered (h, w, a), as :func:`propose` reads them.

        objectness (B, 2A or A, Hf, Wf), deltas (B, 4A, Hf, Wf) -> scores (B, M) float32,
        deltas (B, M, 4) float32.
        """
        b = deltas.shape[0]
        scores = self.foreground_scores(objectness).float()  # (B, M)
        return scores, deltas.permute(0, 2, 3, 1).reshape(b, -1, 4).float()  # (B, M, 4)

    def forward(
        self,
        res4: torch.Tensor,
        image_sizes: list[tuple[int, int]],
        scales: list[float],
        config: ExtractionConfig,
    ) -> list[torch.Tensor]:
        """Proposals per image, in resized-image coordinates.

        Args:
            res4: (B, C4, Hf, Wf) backbone map.
            image_sizes: resized (H, W) of each image.
            scales: resize factor s of each image (for the scaled minimum size).
            config: top-k and NMS settings.

        Returns:
            B tensors (P, 4) float32, x1 y1 x2 y2, ordered by descending objectness.
        """
        objectness, deltas = self.head(res4)
        hf, wf = objectness.shape[2:]
        scores, flat_deltas = self.flat_outputs(objectness, deltas)  # (B, M), (B, M, 4)
        anchors = grid_anchors(self.cell_anchors, hf, wf, self.feature_stride)  # (M, 4)
        settings = ProposalSettings.for_inference(self.conventions, config)
        return [
            propose(anchors, flat_deltas[i], scores[i], image_sizes[i], scales[i], settings)
            for i in range(scores.shape[0])
        ]


@dataclass(frozen=True)
class ProposalSettings:
    """The proposal layer's knobs: how one image's scored anchors become proposals.

    Inference reads them from the weights' ``Conventions`` and the ``ExtractionConfig``
    (:meth:`for_inference`); training states its own (``butd.detector.train.step``).
    """

    # Candidates kept by score before NMS, proposals kept after it, and the NMS IoU.
    pre_nms_topk: int
    post_nms_topk: int
    nms_thresh: float
    # Box convention of decode, clip and the size filter (+1 widths, clip to W-1).
    plus_one: bool
    # Upper bound on dw, dh before exp(); None = no clamp.
    delta_clamp: float | None
    # Minimum proposal side in input pixels (times the image scale when ``min_size_scaled``),
    # and whether a side equal to it is kept.
    min_size: float
    min_size_scaled: bool
    min_size_inclusive: bool
    # Top-k by score before decoding and clipping (detectron2) or after the size filter (Caffe).
    topk_before_clip: bool
    # NMS flavour: +1 areas, and suppression at IoU == thresh too.
    nms_plus_one: bool
    nms_suppress_equal: bool

    @classmethod
    def for_inference(cls, conv: Conventions, config: ExtractionConfig) -> ProposalSettings:
        """Test time: every convention from the weights, top-k and IoU from the config."""
        return cls(
            pre_nms_topk=config.rpn_pre_nms_topk,
            post_nms_topk=config.rpn_post_nms_topk,
            nms_thresh=config.rpn_nms_thresh,
            plus_one=conv.plus_one,
            delta_clamp=conv.delta_clamp,
            min_size=conv.rpn_min_size,
            min_size_scaled=conv.rpn_min_size_scaled,
            min_size_inclusive=conv.rpn_min_size_inclusive,
            topk_before_clip=conv.rpn_topk_before_clip,
            nms_plus_one=conv.plus_one,
            nms_suppress_equal=conv.nms_suppress_equal,
        )


def propose(
    anchors: torch.Tensor,
    deltas: torch.Tensor,
    scores: torch.Tensor,
    image_size: tuple[int, int],
    scale: float,
    settings: ProposalSettings,
) -> torch.Tensor:
    """One image's proposals: decode, clip, size filter, top-k, NMS, top-k.

    The one proposal layer of training and inference; ``settings`` says the order and flavour.

    Args:
        anchors: (M, 4) float32 anchors, rows ordered (h, w, a).
        deltas: (M, 4) float32 RPN deltas of the same rows.
        scores: (M,) float32 foreground probabilities.
        image_size: resized (H, W) the boxes are clipped to.
        scale: resize factor s (for a scaled minimum size).
        settings: top-k, NMS and the box conventions.

    Returns:
        (P, 4) float32 proposals in resized pixels, by descending score.
    """
    s = settings
    if s.topk_before_clip:  # detectron2 / HF: top-k by score first
        order = _top_order(scores, s.pre_nms_topk)
        anchors, deltas, scores = anchors[order], deltas[order], scores[order]
    boxes = decode_boxes(anchors, deltas, plus_one=s.plus_one, clamp=s.delta_clamp)
    boxes = clip_boxes(boxes, image_size[0], image_size[1], plus_one=s.plus_one)
    min_size = s.min_size * (scale if s.min_size_scaled else 1.0)
    keep = keep_min_size(boxes, min_size, plus_one=s.plus_one, inclusive=s.min_size_inclusive)
    boxes, scores = boxes[keep], scores[keep]
    if not s.topk_before_clip:  # Caffe: clip and filter, then top-k
        order = _top_order(scores, s.pre_nms_topk)
        boxes, scores = boxes[order], scores[order]
    kept = nms(
        boxes,
        scores,
        s.nms_thresh,
        plus_one=s.nms_plus_one,
        suppress_equal=s.nms_suppress_equal,
        max_output=s.post_nms_topk,  # greedy prefix: exact, and stops early
    )
    return boxes[kept]


def _top_order(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, descending; ties keep the lower index first."""
    order = torch.sort(scores, descending=True, stable=True).indices
    return order[:k]
