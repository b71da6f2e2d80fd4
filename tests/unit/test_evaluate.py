"""mAP and attribute accuracy on hand-built cases whose numbers are worked out below."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from butd.detector.evaluate import write_csv
from butd.detector.train.metrics import (
    GroundTruth,
    ImageDetections,
    average_precision,
    evaluate,
    voc_ap,
)


def _dets(boxes: list, scores: list, labels: list, attrs: list) -> ImageDetections:
    return ImageDetections(
        np.asarray(boxes, np.float32).reshape(-1, 4),
        np.asarray(scores, np.float32),
        np.asarray(labels, np.int64),
        np.asarray(attrs, np.float32).reshape(len(scores), -1),
    )


def _gt(boxes: list, classes: list, attrs: tuple) -> GroundTruth:
    return GroundTruth(
        np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(classes, np.int64), attrs
    )


G1, G2, G3 = [0, 0, 9, 9], [20, 20, 29, 29], [0, 0, 9, 9]
G4 = [40, 40, 59, 59]
# Two images. Classes: a (0), b (1). Attributes: red (0), small (1).
GTS = [
    _gt([G1, G2], [0, 0], ((0, 1), (0,))),
    _gt([G3, G4], [0, 1], ((), (1,))),
]
DETS = [
    # d1 .9 on G1, d2 .8 duplicate of G1, d3 .7 far from everything.
    _dets(
        [G1, G1, [50, 50, 59, 59]], [0.9, 0.8, 0.7], [0, 0, 0], [[0.7, 0.3], [0.5, 0.5], [0.5, 0.5]]
    ),
    # d4 .6 on G3; d5 .5 class b, 20x30 box over G4: IoU (+1) = 400 / 600 = 0.667.
    _dets([G3, [40, 40, 59, 69]], [0.6, 0.5], [0, 1], [[0.1, 0.9], [0.6, 0.4]]),
]


def test_voc_ap_all_point_interpolation() -> None:
    # precision 1 up to recall .5, then .5 up to recall 1 -> .5 * 1 + .5 * .5 = .75
    assert voc_ap(np.array([0.5, 0.5, 1.0]), np.array([1.0, 0.5, 2 / 3])) == pytest.approx(
        0.5 + 0.5 * (2 / 3)
    )
    assert voc_ap(np.array([0.25, 0.5]), np.array([1.0, 1.0])) == pytest.approx(0.5)


def test_perfect_detections_score_one_and_shifted_boxes_zero() -> None:
    perfect = [
        _dets(g.boxes, [0.9] * len(g.classes), g.classes, [[0.9, 0.05]] * len(g.classes))
        for g in GTS
    ]
    result = evaluate(perfect, GTS, ["a", "b"], ["red", "small"])
    assert result.object_map == pytest.approx(1.0)
    assert result.object_map_weighted == pytest.approx(1.0)
    shifted = [
        _dets(g.boxes + 100, [0.9] * len(g.classes), g.classes, [[0.5, 0.5]] * len(g.classes))
        for g in GTS
    ]
    result = evaluate(shifted, GTS, ["a", "b"], ["red", "small"])
    assert result.object_map == 0.0 and result.attribute_map == 0.0
    assert math.isnan(result.attribute_accuracy) and result.attribute_matched == 0


def test_mixed_case_matches_hand_computation(tmp_path: Path) -> None:
    result = evaluate(DETS, GTS, ["a", "b"], ["red", "small"])
    rows = {(r.kind, r.name): r for r in result.rows}
    # Class a, 3 GT: ranked d1 TP, d2 FP (dup), d3 FP, d4 TP -> precision 1, .5, .33, .5 at
    # recall 1/3, 1/3, 1/3, 2/3 -> AP = 1/3 * 1 + 1/3 * .5 = .5.
    assert rows["object", "a"].ap == pytest.approx(0.5)
    assert rows["object", "a"].num_gt == 3
    # Class b: the single detection is a TP (IoU .667) -> AP 1.
    assert rows["object", "b"].ap == pytest.approx(1.0)
    assert result.object_map == pytest.approx(0.75)
    assert result.object_map_weighted == pytest.approx((0.5 * 3 + 1.0 * 1) / 4)
    # red (GT G1, G2): scores d1 .63 TP, d2 .40, d3 .35, d5 .30, d4 .06 all FP -> AP .5.
    assert rows["attribute", "red"].ap == pytest.approx(0.5)
    # small (GT G1, G4): d4 .54 FP, d2 .40 TP, d3 .35 FP, d1 .27 FP (dup), d5 .20 TP ->
    # precision .5 up to recall .5, then .4 at recall 1 -> AP = .25 + .2 = .45.
    assert rows["attribute", "small"].ap == pytest.approx(0.45)
    assert result.attribute_map == pytest.approx(0.475)
    # Matching: d1 -> G1 (top red, among red/small: hit), d4 -> G3 (no attributes: skipped),
    # d5 -> G4 (top red, G4 is only small: miss) -> 1 / 2.
    assert result.attribute_accuracy == pytest.approx(0.5)
    assert result.attribute_matched == 2
    write_csv(result, tmp_path / "ap.csv")
    lines = (tmp_path / "ap.csv").read_text().splitlines()
    assert lines[0] == "kind,index,name,ap,num_gt"
    assert lines[1] == "object,0,a,0.500000,3" and len(lines) == 5


def test_plus_one_convention_decides_a_borderline_match() -> None:
    # det [0,0,9,9] vs GT [0,0,9,4]: +1 -> 50 / 100 = .5 (TP); without -> 36 / 81 (miss).
    gt = [np.array([[0, 0, 9, 4]], np.float64)]
    scored = [(0, 1.0, np.array([0, 0, 9, 9], np.float64))]
    assert average_precision(scored, gt, plus_one=True) == (1.0, 1)
    assert average_precision(scored, gt, plus_one=False) == (0.0, 1)
    nan_ap, npos = average_precision(scored, [np.zeros((0, 4))])
    assert math.isnan(nan_ap) and npos == 0


def test_packaged_demo_model_detects_fresh_scenes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`butd evaluate` end to end: the shipped demo weights on scenes drawn with a new seed."""
    import argparse
    import json

    import torch

    from butd.cli import train as cli
    from butd.detector.synth import write_synthetic_set

    weights = Path(__file__).parents[2] / "detector/weights/demo/butd-demo.safetensors"
    data = write_synthetic_set(tmp_path / "scenes", 12, 99).out
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "evaluate",
            "--data",
            str(data),
            "--weights",
            str(weights),
            "--no-progress",
            "--csv",
            str(tmp_path / "ap.csv"),
            "--threads",
            "1",
        ]
    )
    before = torch.get_num_threads()
    try:
        assert args.handler(args) == 0
    finally:
        torch.set_num_threads(before)
    summary = json.loads(capsys.readouterr().out)
    # Loose bounds for 12 scenes: the held-out 200-scene figures are in the weights' README.
    assert summary["object_map"] > 0.6
    assert summary["attribute_accuracy"] > 0.8
    assert len((tmp_path / "ap.csv").read_text().splitlines()) == 1 + 6 + 10


def _random_case(seed: int, k: int, a: int) -> tuple[list[ImageDetections], list[GroundTruth]]:
    """Images with jittered copies of their ground truth, strays, duplicates, score ties (scores
    rounded to 0.2), images without ground truth or detections, attribute-less objects."""
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(30):
        g = int(rng.integers(0, 7))
        xy = rng.integers(0, 200, (g, 2)).astype(np.float32)
        boxes = np.concatenate([xy, xy + rng.integers(5, 80, (g, 2))], 1).astype(np.float32)
        classes = rng.integers(0, k, g)
        attrs = tuple(tuple(sorted({*rng.integers(0, a, rng.integers(0, 3))})) for _ in range(g))
        gts.append(_gt(boxes, classes, attrs))
        n = int(rng.integers(0, 12))
        near = boxes[rng.integers(0, g, n)] if g else np.zeros((n, 4), np.float32)
        strays = np.sort(rng.integers(0, 250, (n, 2, 2)), axis=1).reshape(n, 4) + np.array(
            [0, 0, 5, 5]
        )
        stray = rng.random(n) < 0.3 if g else np.ones(n, bool)
        det_boxes = np.where(stray[:, None], strays, near + rng.normal(0, 5, (n, 4)))
        labels = classes[rng.integers(0, g, n)] if g else rng.integers(0, k, n)
        labels = np.where(rng.random(n) < 0.2, rng.integers(0, k, n), labels)
        scores = np.round(rng.random(n) * 5) / 5
        probs = rng.dirichlet(np.ones(a), n).astype(np.float32).reshape(n, a)
        dets.append(
            ImageDetections(
                det_boxes.astype(np.float32),
                scores.astype(np.float32),
                labels.astype(np.int64),
                probs,
            )
        )
    return dets, gts


def _voc_eval(detections: list, truth: list, thresh: float, plus_one: bool) -> tuple[float, int]:
    """py-faster-rcnn ``voc_eval`` for one class, written as a plain loop.

    ``detections``: (image, confidence, box) in image, then detection order (stable ranking);
    ``truth``: per image, a list of boxes. A detection takes its best-IoU box of the image (the
    first on ties); IoU >= thresh on an unclaimed box is a TP.
    """
    one = 1.0 if plus_one else 0.0
    npos = sum(len(t) for t in truth)
    if npos == 0:
        return math.nan, 0
    ranked = sorted(detections, key=lambda d: -d[1])  # stable
    claimed = [[False] * len(t) for t in truth]
    hits = []
    for image, _, bb in ranked:
        best, jbest = -math.inf, -1
        for j, gt in enumerate(truth[image]):
            iw = min(bb[2], gt[2]) - max(bb[0], gt[0]) + one
            ih = min(bb[3], gt[3]) - max(bb[1], gt[1]) + one
            inter = max(iw, 0.0) * max(ih, 0.0)
            area_b = (bb[2] - bb[0] + one) * (bb[3] - bb[1] + one)
            area_g = (gt[2] - gt[0] + one) * (gt[3] - gt[1] + one)
            iou = inter / (area_b + area_g - inter)
            if iou > best:
                best, jbest = iou, j
        hit = best >= thresh and not claimed[image][jbest]
        if hit:
            claimed[image][jbest] = True
        hits.append(hit)
    tp = np.cumsum(hits)
    recall = [0.0, *(tp / npos), 1.0]
    precision = [0.0, *(tp / np.arange(1, len(hits) + 1)), 0.0]
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    area = sum(
        (recall[i + 1] - recall[i]) * precision[i + 1]
        for i in range(len(recall) - 1)
        if recall[i + 1] != recall[i]
    )
    return area, npos


@pytest.mark.parametrize(("thresh", "plus_one"), [(0.5, True), (0.5, False), (0.3, True)])
def test_object_and_attribute_ap_match_voc_eval_on_random_scenes(
    thresh: float, plus_one: bool
) -> None:
    k, a = 6, 8
    dets, gts = _random_case(7, k, a)
    result = evaluate(
        dets, gts, list("abcdef"), list("rstuvwxy"), iou_thresh=thresh, plus_one=plus_one
    )
    b64 = [[tuple(map(float, box)) for box in d.boxes] for d in dets]
    expected = []
    for c in range(k):
        found = [
            (i, float(d.scores[j]), b64[i][j])
            for i, d in enumerate(dets)
            for j in range(len(d.scores))
            if d.labels[j] == c
        ]
        truth = [
            [tuple(map(float, b)) for b, cl in zip(g.boxes, g.classes, strict=True) if cl == c]
            for g in gts
        ]
        expected.append(("object", c, *_voc_eval(found, truth, thresh, plus_one)))
    for t in range(a):
        # The attribute score is the float32 product score x P(t), as ranked in float32.
        found = [
            (i, float(np.float32(d.scores[j]) * np.float32(d.attr_probs[j, t])), b64[i][j])
            for i, d in enumerate(dets)
            for j in range(len(d.scores))
        ]
        truth = [
            [tuple(map(float, b)) for b, at in zip(g.boxes, g.attributes, strict=True) if t in at]
            for g in gts
        ]
        expected.append(("attribute", t, *_voc_eval(found, truth, thresh, plus_one)))
    assert [(r.kind, r.index, r.num_gt) for r in result.rows] == [e[:2] + e[3:] for e in expected]
    assert sum(r.num_gt > 0 for r in result.rows) >= k + a - 2  # the fixture is not degenerate
    for r, e in zip(result.rows, expected, strict=True):
        assert r.ap == pytest.approx(e[2], rel=1e-12, abs=1e-12, nan_ok=True), (r.kind, r.name)
    assert 0.1 < result.object_map < 0.9 and 0.0 < result.attribute_map < 0.5
