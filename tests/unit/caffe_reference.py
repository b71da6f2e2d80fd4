"""Independent NumPy ports of Caffe test-time steps, for tests (reference §1.3, §1.4, §1.6).

Written from the Caffe layer descriptions, not from the code under test.
"""

from __future__ import annotations

import math

import numpy as np

# Reference §1.3: the 12 Caffe anchors, ratio-major.
CAFFE_ANCHORS = np.array(
    [
        [-38, -16, 53, 31],
        [-84, -40, 99, 55],
        [-176, -88, 191, 103],
        [-360, -184, 375, 199],
        [-24, -24, 39, 39],
        [-56, -56, 71, 71],
        [-120, -120, 135, 135],
        [-248, -248, 263, 263],
        [-14, -36, 29, 51],
        [-36, -80, 51, 95],
        [-80, -168, 95, 183],
        [-168, -344, 183, 359],
    ],
    dtype=np.float64,
)


def caffe_roi_pool(fmap: np.ndarray, roi: np.ndarray, size: int, scale: float) -> np.ndarray:
    """Caffe ROIPoolingLayer, one RoI: fmap (C, H, W), roi (x1, y1, x2, y2) -> (C, size, size)."""
    c, h, w = fmap.shape
    x1, y1, x2, y2 = (math.floor(v * scale + 0.5) for v in roi)  # C round(), coords >= 0
    roi_w, roi_h = max(x2 - x1 + 1, 1), max(y2 - y1 + 1, 1)
    bin_w, bin_h = roi_w / size, roi_h / size
    out = np.zeros((c, size, size), dtype=fmap.dtype)
    for ph in range(size):
        hs = min(max(math.floor(ph * bin_h) + y1, 0), h)
        he = min(max(math.ceil((ph + 1) * bin_h) + y1, 0), h)
        for pw in range(size):
            ws = min(max(math.floor(pw * bin_w) + x1, 0), w)
            we = min(max(math.ceil((pw + 1) * bin_w) + x1, 0), w)
            if he > hs and we > ws:
                out[:, ph, pw] = fmap[:, hs:he, ws:we].max(axis=(1, 2))
    return out


def caffe_proposals(
    scores_map, deltas_map, img_h, img_w, scale, cfg, *, clamp=None, nms_flavour="caffe"
) -> np.ndarray:
    """NumPy port of Caffe's proposal_layer.py for one image.

    Test mode by default. The project's training recipe (``butd.detector.train.step``) is the same
    layer with ``clamp`` on dw/dh (log(1000/16)) and ``nms_flavour="torchvision"`` (no +1
    areas, suppression only at IoU > thresh).
    """
    from tests.unit.reference_nms import reference_nms

    a = CAFFE_ANCHORS.shape[0]
    _, _, hf, wf = deltas_map.shape
    sx, sy = np.meshgrid(np.arange(wf) * 16, np.arange(hf) * 16)
    shifts = np.stack([sx.ravel(), sy.ravel(), sx.ravel(), sy.ravel()], axis=1)
    anchors = (CAFFE_ANCHORS[None] + shifts[:, None]).reshape(-1, 4).astype(np.float32)
    logits = scores_map.reshape(1, 2, a * hf, wf)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob = (e / e.sum(axis=1, keepdims=True)).reshape(1, 2 * a, hf, wf)[:, a:]
    scores = prob.transpose(0, 2, 3, 1).reshape(-1)
    d = deltas_map.transpose(0, 2, 3, 1).reshape(-1, 4).copy()
    if clamp is not None:
        d[:, 2:] = np.minimum(d[:, 2:], np.float32(clamp))
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    cx, cy = anchors[:, 0] + 0.5 * widths, anchors[:, 1] + 0.5 * heights
    pcx, pcy = d[:, 0] * widths + cx, d[:, 1] * heights + cy
    pw, ph = np.exp(d[:, 2]) * widths, np.exp(d[:, 3]) * heights
    boxes = np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1)
    boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, img_w - 1)
    boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, img_h - 1)
    keep = ((boxes[:, 2] - boxes[:, 0] + 1) >= 16 * scale) & (
        (boxes[:, 3] - boxes[:, 1] + 1) >= 16 * scale
    )
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[: cfg.rpn_pre_nms_topk]
    boxes, scores = boxes[order], scores[order]
    caffe = nms_flavour == "caffe"
    kept = reference_nms(boxes, scores, cfg.rpn_nms_thresh, plus_one=caffe, suppress_equal=caffe)
    return boxes[kept[: cfg.rpn_post_nms_topk]]
