"""mAP and attribute accuracy on hand-built cases whose numbers are worked out below."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from detector.evaluate import (
    GroundTruth,
    ImageDetections,
    average_precision,
    evaluate,
    voc_ap,
    write_csv,
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

    from detector.synth import write_synthetic_set
    from service.cli import train as cli

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
