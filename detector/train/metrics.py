"""Detection metrics: object and attribute mAP@0.5 (VOC style) and attribute accuracy.

The numbers the original bottom-up-attention README reports (§1.8): per-class average precision
at IoU 0.5 with all-point interpolation (VOC 2010+), their mean over the classes that have
ground truth, and a *weighted* mean where each class's AP counts in proportion to its number of
ground-truth instances.

* Object AP of class c: the detections labelled c (score = class probability) against the
  ground-truth objects of class c; each ground truth matches at most one detection, in
  descending score order, at IoU >= 0.5 (the +1 pixel convention by default); a second
  detection of a matched object is a false positive.
* Attribute AP of attribute a: every detection, scored ``object score x P(a)``, against the
  ground-truth objects carrying attribute a (class-agnostic boxes).
* Attribute accuracy: detections are matched one-to-one to ground-truth objects (any class,
  IoU >= 0.5, descending score); over the matched objects that have attributes, the fraction
  whose detection's top attribute (no-attribute excluded) is one of the object's attributes.

Shape glossary:
    N   detections of one image
    G   ground-truth objects of one image
    A   attributes (no-attribute excluded)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ImageDetections:
    """Scored detections of one image, in original-image pixels.

    Attributes:
        boxes: (N, 4) float32 x1, y1, x2, y2.
        scores: (N,) float32 probability of ``labels``.
        labels: (N,) int64 0-based object class (background excluded).
        attr_probs: (N, A) float32 attribute probabilities (no-attribute column dropped).
    """

    boxes: FloatArray
    scores: FloatArray
    labels: IntArray
    attr_probs: FloatArray

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.labels.shape != (n,) or len(self.attr_probs) != n:
            raise ValueError(
                f"detections disagree: boxes {self.boxes.shape}, scores ({n},), "
                f"labels {self.labels.shape}, attr_probs {self.attr_probs.shape}"
            )


@dataclass(frozen=True)
class GroundTruth:
    """Ground truth of one image: boxes (G, 4), 0-based classes (G,), attribute id tuples."""

    boxes: FloatArray
    classes: IntArray
    attributes: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class ClassAP:
    """One row of the per-class table."""

    kind: str  # "object" or "attribute"
    index: int
    name: str
    ap: float
    num_gt: int


@dataclass(frozen=True)
class EvalResult:
    """Summary metrics (fractions in [0, 1]) and the per-class rows."""

    object_map: float
    object_map_weighted: float
    attribute_map: float
    attribute_map_weighted: float
    attribute_accuracy: float
    attribute_matched: int
    rows: list[ClassAP] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {
            "object_map": self.object_map,
            "object_map_weighted": self.object_map_weighted,
            "attribute_map": self.attribute_map,
            "attribute_map_weighted": self.attribute_map_weighted,
            "attribute_accuracy": self.attribute_accuracy,
            "attribute_matched": float(self.attribute_matched),
        }


def box_iou_np(a: np.ndarray, b: np.ndarray, *, plus_one: bool = True) -> np.ndarray:
    """IoU matrix (N, G) of boxes a (N, 4) and b (G, 4); ``plus_one`` adds 1 to widths."""
    one = 1.0 if plus_one else 0.0
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]) + one
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]) + one
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0] + one) * (a[:, 3] - a[:, 1] + one)
    area_b = (b[:, 2] - b[:, 0] + one) * (b[:, 3] - b[:, 1] + one)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision envelope, all points (VOC 2010+ ``voc_ap(use_07_metric=False)``)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def average_precision(
    scored: Sequence[tuple[int, float, np.ndarray]],
    gt_boxes: Sequence[np.ndarray],
    *,
    iou_thresh: float = 0.5,
    plus_one: bool = True,
) -> tuple[float, int]:
    """AP of one class.

    Args:
        scored: (image index, score, box (4,)) of every detection of the class.
        gt_boxes: per image, (G_c, 4) ground-truth boxes of the class.
        iou_thresh: minimum IoU of a true positive.
        plus_one: box convention of the IoU.

    Returns:
        (AP, number of ground-truth instances); AP is NaN when there is no ground truth.
    """
    npos = int(sum(len(g) for g in gt_boxes))
    if npos == 0:
        return float("nan"), 0
    order = sorted(range(len(scored)), key=lambda i: -scored[i][1])
    used = [np.zeros(len(g), dtype=bool) for g in gt_boxes]
    tp = np.zeros(len(order))
    for rank, i in enumerate(order):
        image, _, box = scored[i]
        gts = gt_boxes[image]
        if len(gts) == 0:
            continue
        ious = box_iou_np(np.asarray(box, dtype=np.float64)[None], gts, plus_one=plus_one)[0]
        j = int(np.argmax(ious))
        if ious[j] >= iou_thresh and not used[image][j]:
            used[image][j] = True
            tp[rank] = 1.0
    ctp = np.cumsum(tp)
    recall = ctp / npos
    precision = ctp / np.arange(1, len(order) + 1)
    return voc_ap(recall, precision), npos


def _means(rows: list[ClassAP]) -> tuple[float, float]:
    valid = [r for r in rows if r.num_gt > 0]
    if not valid:
        return float("nan"), float("nan")
    aps = np.array([r.ap for r in valid])
    weights = np.array([r.num_gt for r in valid], dtype=np.float64)
    return float(aps.mean()), float((aps * weights).sum() / weights.sum())


@dataclass(frozen=True)
class ClassView:
    """One kind of class (objects or attributes) over the images, as ``class_aps`` reads it.

    Attributes:
        scores: per image (N, C) float32, the score of each detection for each class.
        candidates: per image (N, C) bool, which detections compete for which class.
        members: per image (G, C) bool, which ground-truth objects belong to which class.
    """

    scores: list[FloatArray]
    candidates: list[BoolArray]
    members: list[BoolArray]


def object_view(
    dets: Sequence[ImageDetections], gts: Sequence[GroundTruth], num_classes: int
) -> ClassView:
    """Objects: a detection competes for its label only, with its score."""
    classes = np.arange(num_classes)
    return ClassView(
        scores=[np.broadcast_to(d.scores[:, None], (len(d.scores), num_classes)) for d in dets],
        candidates=[d.labels[:, None] == classes for d in dets],  # (N, K) each
        members=[g.classes[:, None] == classes for g in gts],  # (G, K) each
    )


def attribute_view(
    dets: Sequence[ImageDetections], gts: Sequence[GroundTruth], num_attributes: int
) -> ClassView:
    """Attributes: every detection competes, scored ``score x P(attribute)`` (float32)."""
    members = []
    for g in gts:
        m = np.zeros((len(g.attributes), num_attributes), dtype=bool)  # (G, A)
        for j, attrs in enumerate(g.attributes):
            m[j, [a for a in attrs if 0 <= a < num_attributes]] = True
        members.append(m)
    return ClassView(
        scores=[d.scores[:, None] * d.attr_probs for d in dets],  # (N, A) each
        candidates=[np.ones((len(d.scores), num_attributes), dtype=bool) for d in dets],
        members=members,
    )


def class_aps(
    kind: str,
    names: Sequence[str],
    dets: Sequence[ImageDetections],
    gts: Sequence[GroundTruth],
    view: ClassView,
    *,
    iou_thresh: float = 0.5,
    plus_one: bool = True,
) -> list[ClassAP]:
    """Per-class AP rows, the one AP of objects and attributes (``view`` says which).

    Classes without ground truth get NaN and num_gt 0. Detections enter each class's ranking in
    image order, then detection order (ties in score keep that order).
    """
    rows = []
    for c, name in enumerate(names):
        scored = [
            (i, float(s[k, c]), d.boxes[k])
            for i, (d, s, m) in enumerate(zip(dets, view.scores, view.candidates, strict=True))
            for k in np.flatnonzero(m[:, c])
        ]
        gt_c = [
            g.boxes[m[:, c]].astype(np.float64).reshape(-1, 4)
            for g, m in zip(gts, view.members, strict=True)
        ]
        ap, npos = average_precision(scored, gt_c, iou_thresh=iou_thresh, plus_one=plus_one)
        rows.append(ClassAP(kind, c, name, ap, npos))
    return rows


def match_one_to_one(
    det: ImageDetections, gt: GroundTruth, *, iou_thresh: float = 0.5, plus_one: bool = True
) -> list[tuple[int, int]]:
    """Greedy class-agnostic matching, descending score: (detection, ground truth) pairs."""
    if len(det.scores) == 0 or len(gt.classes) == 0:
        return []
    ious = box_iou_np(det.boxes.astype(np.float64), gt.boxes.astype(np.float64), plus_one=plus_one)
    used = np.zeros(len(gt.classes), dtype=bool)
    pairs = []
    for k in np.argsort(-det.scores, kind="stable"):
        candidates = np.where(used, -1.0, ious[k])
        j = int(np.argmax(candidates))
        if candidates[j] >= iou_thresh:
            used[j] = True
            pairs.append((int(k), j))
    return pairs


def attribute_accuracy(
    dets: Sequence[ImageDetections],
    gts: Sequence[GroundTruth],
    *,
    iou_thresh: float = 0.5,
    plus_one: bool = True,
) -> tuple[float, int]:
    """(accuracy, number of matched objects with attributes); NaN accuracy when none."""
    hits = total = 0
    for det, gt in zip(dets, gts, strict=True):
        for k, j in match_one_to_one(det, gt, iou_thresh=iou_thresh, plus_one=plus_one):
            if gt.attributes[j]:
                total += 1
                hits += int(np.argmax(det.attr_probs[k])) in gt.attributes[j]
    return (hits / total if total else float("nan")), total


def evaluate(
    dets: Sequence[ImageDetections],
    gts: Sequence[GroundTruth],
    objects_vocab: Sequence[str],
    attributes_vocab: Sequence[str],
    *,
    iou_thresh: float = 0.5,
    plus_one: bool = True,
) -> EvalResult:
    """All metrics for detections and ground truth of the same images (same order)."""
    if len(dets) != len(gts):
        raise ValueError(f"{len(dets)} detection sets for {len(gts)} ground-truth images")
    objects = object_view(dets, gts, len(objects_vocab))
    attributes = attribute_view(dets, gts, len(attributes_vocab))
    obj_rows = class_aps(
        "object", objects_vocab, dets, gts, objects, iou_thresh=iou_thresh, plus_one=plus_one
    )
    attr_rows = class_aps(
        "attribute",
        attributes_vocab,
        dets,
        gts,
        attributes,
        iou_thresh=iou_thresh,
        plus_one=plus_one,
    )
    acc, matched = attribute_accuracy(dets, gts, iou_thresh=iou_thresh, plus_one=plus_one)
    return EvalResult(*_means(obj_rows), *_means(attr_rows), acc, matched, obj_rows + attr_rows)
