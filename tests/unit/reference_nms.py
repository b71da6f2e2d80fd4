"""Independent NumPy references: sequential greedy NMS and the generate_tsv.py selection loop.

Written from the descriptions of py-faster-rcnn ``nms/cpu_nms.pyx`` and
``tools/generate_tsv.py::get_detections_from_im`` (reference §1.3, §1.6), not from the torch
code under test: one box at a time in score order, float32 arithmetic, the threshold compared in
double precision. Ties in score order go to the lower index (a stable sort); Caffe's quicksort
leaves them undefined.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]


def reference_nms(
    dets: npt.ArrayLike,
    scores: npt.ArrayLike,
    thresh: float,
    *,
    plus_one: bool = True,
    suppress_equal: bool = True,
) -> list[int]:
    """Sequential greedy NMS.

    Args:
        dets: (N, 4) boxes x1, y1, x2, y2 (cast to float32).
        scores: (N,) scores (cast to float32).
        thresh: IoU threshold, compared as a double.
        plus_one: legacy +1 areas and intersection sides.
        suppress_equal: suppress at IoU == thresh (``>=``) rather than only ``>``.

    Returns:
        Kept indices in visiting order.
    """
    d = np.asarray(dets, dtype=np.float32)
    s = np.asarray(scores, dtype=np.float32)
    one = np.float32(1.0 if plus_one else 0.0)
    x1, y1, x2, y2 = d[:, 0], d[:, 1], d[:, 2], d[:, 3]
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-s, kind="stable")
    suppressed = np.zeros(len(s), dtype=bool)
    keep: list[int] = []
    with np.errstate(invalid="ignore", divide="ignore"):
        for pos, i in enumerate(order):
            if suppressed[i]:
                continue
            keep.append(int(i))
            rest = order[pos + 1 :]
            w = np.maximum(
                np.float32(0.0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one
            )
            h = np.maximum(
                np.float32(0.0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one
            )
            inter = w * h
            ovr = (inter / (areas[i] + areas[rest] - inter)).astype(np.float64)
            hit = ovr >= thresh if suppress_equal else ovr > thresh
            suppressed[rest[hit]] = True
    return keep


def reference_max_conf(
    boxes: npt.ArrayLike,
    cls_prob: npt.ArrayLike,
    nms_thresh: float = 0.3,
    *,
    plus_one: bool = True,
    suppress_equal: bool = True,
) -> npt.NDArray[np.float64]:
    """``max_conf`` of generate_tsv.py: one NMS per class 1..K, background column 0 skipped."""
    b = np.asarray(boxes, dtype=np.float32)
    p = np.asarray(cls_prob, dtype=np.float32)
    max_conf = np.zeros(p.shape[0])
    for c in range(1, p.shape[1]):
        keep = np.array(
            reference_nms(b, p[:, c], nms_thresh, plus_one=plus_one, suppress_equal=suppress_equal),
            dtype=np.int64,
        )
        if keep.size == 0:
            continue
        cls = p[keep, c]
        max_conf[keep] = np.where(cls > max_conf[keep], cls, max_conf[keep])
    return max_conf


def reference_select(
    boxes: npt.ArrayLike,
    cls_prob: npt.ArrayLike,
    *,
    nms_thresh: float = 0.3,
    conf_thresh: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
    plus_one: bool = True,
    suppress_equal: bool = True,
) -> tuple[npt.NDArray[np.int64], F32]:
    """The generate_tsv.py selection: (keep_boxes indices, max_conf as float32)."""
    max_conf = reference_max_conf(
        boxes, cls_prob, nms_thresh, plus_one=plus_one, suppress_equal=suppress_equal
    )
    return reference_keep(max_conf, conf_thresh, min_boxes, max_boxes), max_conf.astype(np.float32)


def reference_keep(
    max_conf: npt.NDArray[np.float64], conf_thresh: float, min_boxes: int, max_boxes: int
) -> npt.NDArray[np.int64]:
    """generate_tsv.py's threshold and MIN/MAX clamp on ``max_conf`` (stable argsort for ties)."""
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(-max_conf, kind="stable")[:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(-max_conf, kind="stable")[:max_boxes]
    return keep_boxes.astype(np.int64)
