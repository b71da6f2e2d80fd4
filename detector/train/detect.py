"""Scored, class-specific detections for evaluation (py-faster-rcnn ``test_net``).

Unlike feature extraction (``generate_tsv.py`` keeps the proposals), evaluation uses the
regressed class-specific boxes: proposals / scale, decoded with each class's deltas, clipped to
the image; per class, scores above ``score_thresh`` go through NMS (TEST.NMS 0.3), and the best
``max_per_image`` detections over all classes are kept.

Shape glossary:
    P   proposals of the image
    K   object classes (K+1 logits, background 0)
    At  attributes (At+1 logits, no-attribute 0)
    N   detections kept
"""

from __future__ import annotations

import numpy as np
import torch

from butd.detector.boxes import clip_boxes, decode_boxes, nms
from butd.detector.config import ExtractionConfig
from butd.detector.model import Detector
from butd.detector.preprocess import prepare
from butd.detector.train.metrics import ImageDetections


def _attr_probs(attr_logits: torch.Tensor, mode: str) -> torch.Tensor:
    """(P, At+1) logits -> (P, At) probabilities of the real attributes."""
    if mode == "softmax_all":
        return attr_logits.softmax(dim=1)[:, 1:]
    return attr_logits[:, 1:].softmax(dim=1)


def _per_class(
    boxes: torch.Tensor,
    probs: torch.Tensor,
    score_thresh: float,
    nms_thresh: float,
    plus_one: bool,
    suppress_equal: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Per class: kept proposal indices, boxes and scores (class-specific NMS)."""
    rows, kept_boxes, labels = [], [], []
    for c in range(1, probs.shape[1]):
        idx = torch.nonzero(probs[:, c] > score_thresh).flatten()
        if idx.numel() == 0:
            continue
        cb = boxes[idx, 4 * c : 4 * c + 4]
        keep = nms(cb, probs[idx, c], nms_thresh, plus_one=plus_one, suppress_equal=suppress_equal)
        rows.append(idx[keep])
        kept_boxes.append(cb[keep])
        labels.append(torch.full((keep.numel(),), c - 1, dtype=torch.int64))
    return rows, kept_boxes, labels


@torch.no_grad()
def detect(
    model: Detector,
    image_bgr: np.ndarray,
    config: ExtractionConfig,
    *,
    score_thresh: float = 0.05,
    nms_thresh: float = 0.3,
    max_per_image: int = 100,
) -> ImageDetections:
    """Detections of one image (BGR uint8 (H, W, 3)) in original-image pixels."""
    conv = model.spec.conventions
    device = next(model.parameters()).device
    prepared = prepare(image_bgr, config, device=device)
    res4 = model.backbone(prepared.tensor[None])
    size = prepared.resized_hw
    proposals = model.rpn(res4, [size], [prepared.scale], config)[0]  # (P, 4)
    out = model.regions(res4, [proposals])[0]
    _, deltas = model.roi_heads.predict(out.features)  # (P, (K+1)*4)
    rois = proposals.float() / prepared.scale
    boxes = decode_boxes(
        rois,
        deltas.float(),
        plus_one=conv.plus_one,
        weights=conv.bbox_reg_weights,
        clamp=conv.delta_clamp,
    )
    boxes = clip_boxes(boxes, prepared.orig_h, prepared.orig_w, plus_one=conv.plus_one)
    probs = out.cls_logits.float().softmax(dim=1)  # (P, K+1)
    attr = _attr_probs(out.attr_logits.float(), conv.attr_score)  # (P, At)
    rows, kept, labels = _per_class(
        boxes, probs, score_thresh, nms_thresh, conv.plus_one, conv.nms_suppress_equal
    )
    if not rows:
        a = attr.shape[1]
        return ImageDetections(
            np.zeros((0, 4), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.int64),
            np.zeros((0, a), np.float32),
        )
    row, label = torch.cat(rows), torch.cat(labels).to(device)
    score = probs[row, label + 1]
    order = torch.sort(score, descending=True, stable=True).indices[:max_per_image]
    return ImageDetections(
        boxes=torch.cat(kept)[order].cpu().numpy().astype(np.float32),
        scores=score[order].cpu().numpy().astype(np.float32),
        labels=label[order].cpu().numpy().astype(np.int64),
        attr_probs=attr[row[order]].cpu().numpy().astype(np.float32),
    )
