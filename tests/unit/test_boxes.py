"""Box math against independent NumPy / scalar references (reference §1.3, §2.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision

from butd.detector.boxes import (
    box_area,
    box_iou,
    clip_boxes,
    decode_boxes,
    encode_boxes,
    float32_threshold,
    keep_min_size,
    nms,
)
from tests.unit.reference_nms import reference_nms


def _random_boxes(rng: np.random.Generator, n: int, extent: float = 600.0) -> np.ndarray:
    xy = rng.uniform(0, extent, (n, 2))
    wh = rng.uniform(0, extent / 3, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(np.float32)


def _np_decode(anchors: np.ndarray, deltas: np.ndarray, plus_one: bool, weights, clamp):
    """py-faster-rcnn bbox_transform_inv / detectron2 apply_deltas, written in NumPy float32."""
    one = np.float32(1.0 if plus_one else 0.0)
    a = anchors.astype(np.float32)
    widths = a[:, 2] - a[:, 0] + one
    heights = a[:, 3] - a[:, 1] + one
    ctr_x = a[:, 0] + np.float32(0.5) * widths
    ctr_y = a[:, 1] + np.float32(0.5) * heights
    w = np.asarray(weights, dtype=np.float32)
    dx, dy = deltas[:, 0::4] / w[0], deltas[:, 1::4] / w[1]
    dw, dh = deltas[:, 2::4] / w[2], deltas[:, 3::4] / w[3]
    if clamp is not None:
        dw, dh = np.minimum(dw, np.float32(clamp)), np.minimum(dh, np.float32(clamp))
    pcx = dx * widths[:, None] + ctr_x[:, None]
    pcy = dy * heights[:, None] + ctr_y[:, None]
    pw = np.exp(dw) * widths[:, None]
    ph = np.exp(dh) * heights[:, None]
    out = np.zeros_like(deltas)
    out[:, 0::4] = pcx - np.float32(0.5) * pw
    out[:, 1::4] = pcy - np.float32(0.5) * ph
    out[:, 2::4] = pcx + np.float32(0.5) * pw
    out[:, 3::4] = pcy + np.float32(0.5) * ph
    return out


@pytest.mark.parametrize(
    ("plus_one", "weights", "clamp"),
    [
        (True, (1, 1, 1, 1), None),
        (False, (10, 10, 5, 5), math.log(1000 / 16)),
        (True, (1, 1, 1, 1), 1.0),
    ],
)
def test_decode_matches_numpy_reference(plus_one, weights, clamp) -> None:
    rng = np.random.default_rng(0)
    anchors = _random_boxes(rng, 200)
    deltas = rng.normal(0, 1.5, (200, 12)).astype(np.float32)  # 3 classes
    got = decode_boxes(
        torch.from_numpy(anchors),
        torch.from_numpy(deltas),
        plus_one=plus_one,
        weights=weights,
        clamp=clamp,
    )
    want = _np_decode(anchors, deltas, plus_one, weights, clamp)
    assert got.shape == (200, 12) and got.dtype == torch.float32
    # Only exp may differ (1 ulp between libm and torch); everything else is op-for-op float32.
    np.testing.assert_allclose(got.numpy(), want, rtol=2e-6, atol=1e-4)


def test_decode_caffe_convention_by_hand() -> None:
    # Anchor [0, 0, 15, 15]: w = 16, ctr = 8; dx = 0.5 moves the centre by 8, dw = log 2 doubles.
    anchor = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    deltas = torch.tensor([[0.5, 0.0, math.log(2.0), 0.0]])
    caffe = decode_boxes(anchor, deltas, plus_one=True)
    d2 = decode_boxes(anchor, deltas, plus_one=False)
    torch.testing.assert_close(caffe, torch.tensor([[0.0, 0.0, 32.0, 16.0]]), rtol=0, atol=1e-5)
    # No +1: w = 15, ctr 7.5 -> 15; w' = 30.
    torch.testing.assert_close(d2, torch.tensor([[0.0, 0.0, 30.0, 15.0]]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("plus_one", [True, False])
def test_encode_inverts_decode(plus_one: bool) -> None:
    rng = np.random.default_rng(1)
    anchors = torch.from_numpy(_random_boxes(rng, 100)) + torch.tensor([0, 0, 4.0, 4.0])
    targets = torch.from_numpy(_random_boxes(rng, 100)) + torch.tensor([0, 0, 4.0, 4.0])
    weights = (10.0, 10.0, 5.0, 5.0)
    deltas = encode_boxes(anchors, targets, plus_one=plus_one, weights=weights)
    back = decode_boxes(anchors, deltas, plus_one=plus_one, weights=weights)
    # Caffe's bbox_transform_inv puts x2' at ctr' + w'/2 although w counted +1, so its round trip
    # lands one pixel right and down: the asymmetry the released models were trained with.
    shift = torch.tensor([0.0, 0.0, 1.0, 1.0]) if plus_one else torch.zeros(4)
    torch.testing.assert_close(back, targets + shift, rtol=0, atol=2e-3)


def test_clip_ranges() -> None:
    boxes = torch.tensor([[-5.0, -3.0, 700.0, 500.0, 10.0, 20.0, 30.0, 40.0]])
    legacy = clip_boxes(boxes, 480, 640, plus_one=True)
    modern = clip_boxes(boxes, 480, 640, plus_one=False)
    assert legacy[0].tolist() == [0.0, 0.0, 639.0, 479.0, 10.0, 20.0, 30.0, 40.0]
    assert modern[0].tolist() == [0.0, 0.0, 640.0, 480.0, 10.0, 20.0, 30.0, 40.0]
    assert boxes[0, 0] == -5.0  # input untouched


def _scalar_iou(a, b, plus_one: bool) -> float:
    """cpu_nms.pyx's per-pair arithmetic, one float32 operation at a time."""
    f = np.float32
    one = f(1.0 if plus_one else 0.0)
    area_a = (f(a[2]) - f(a[0]) + one) * (f(a[3]) - f(a[1]) + one)
    area_b = (f(b[2]) - f(b[0]) + one) * (f(b[3]) - f(b[1]) + one)
    w = max(f(0.0), f(min(a[2], b[2])) - f(max(a[0], b[0])) + one)
    h = max(f(0.0), f(min(a[3], b[3])) - f(max(a[1], b[1])) + one)
    inter = f(w * h)
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(f(inter / f(f(area_a + area_b) - inter)))


@pytest.mark.parametrize("plus_one", [True, False])
def test_iou_bitwise_equals_scalar_loop(plus_one: bool) -> None:
    rng = np.random.default_rng(2)
    a, b = _random_boxes(rng, 40), _random_boxes(rng, 30)
    b[:5] = a[:5]  # identical pairs
    got = box_iou(torch.from_numpy(a), torch.from_numpy(b), plus_one=plus_one).numpy()
    want = np.array([[_scalar_iou(x, y, plus_one) for y in b] for x in a], dtype=np.float32)
    np.testing.assert_array_equal(got, want)
    if not plus_one:
        tv = torchvision.ops.box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()
        np.testing.assert_array_equal(got, tv)


def test_area_conventions() -> None:
    boxes = torch.tensor([[0.0, 0.0, 9.0, 4.0]])
    assert box_area(boxes, plus_one=True).item() == 50.0
    assert box_area(boxes, plus_one=False).item() == 36.0


@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7, 1 / 3, 0.1])
def test_float32_threshold_reproduces_double_comparison(thresh: float) -> None:
    centre = np.float32(thresh)
    xs = [centre]
    for _ in range(3):
        xs = [np.nextafter(xs[0], np.float32(-1)), *xs, np.nextafter(xs[-1], np.float32(2))]
    t_ge = float32_threshold(thresh, inclusive=True)
    t_gt = float32_threshold(thresh, inclusive=False)
    for x in xs:
        x32 = torch.tensor(x, dtype=torch.float32)
        assert bool(x32 >= t_ge) == (float(x) >= thresh)
        assert bool(x32 > t_gt) == (float(x) > thresh)


def _nms_cases(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 500, (max(n // 8, 1), 2))
    pick = rng.integers(0, len(centres), n)
    half = rng.uniform(5, 80, (n, 2))
    jitter = rng.normal(0, 10, (n, 2))
    ctr = centres[pick] + jitter
    boxes = np.concatenate([ctr - half, ctr + half], axis=1).astype(np.float32)
    scores = rng.random(n).astype(np.float32)
    return boxes, scores


@pytest.mark.parametrize("flavour", [(True, True), (False, False), (True, False), (False, True)])
@pytest.mark.parametrize(("seed", "n", "thresh"), [(0, 60, 0.3), (1, 300, 0.5), (2, 800, 0.7)])
def test_nms_equals_sequential_reference(flavour, seed: int, n: int, thresh: float) -> None:
    plus_one, suppress_equal = flavour
    boxes, scores = _nms_cases(seed, n)
    got = nms(
        torch.from_numpy(boxes),
        torch.from_numpy(scores),
        thresh,
        plus_one=plus_one,
        suppress_equal=suppress_equal,
    )
    want = reference_nms(boxes, scores, thresh, plus_one=plus_one, suppress_equal=suppress_equal)
    assert got.dtype == torch.int64
    assert got.tolist() == want


@pytest.mark.parametrize("flavour", [(True, True), (False, False)])
def test_nms_ties_duplicates_and_empty_boxes(flavour) -> None:
    plus_one, suppress_equal = flavour
    boxes, scores = _nms_cases(3, 700)
    scores = np.round(scores * 4) / 4  # five distinct values: many ties
    boxes[100:150] = boxes[0:50]  # exact duplicates
    boxes[200:220, 2:] = boxes[200:220, :2] - (1.0 if plus_one else 0.0)  # zero area
    boxes[220:230, 2:] = boxes[220:230, :2] - 5.0  # negative size
    got = nms(
        torch.from_numpy(boxes),
        torch.from_numpy(scores.astype(np.float32)),
        0.3,
        plus_one=plus_one,
        suppress_equal=suppress_equal,
    )
    want = reference_nms(boxes, scores, 0.3, plus_one=plus_one, suppress_equal=suppress_equal)
    assert got.tolist() == want


def test_nms_equal_iou_rule() -> None:
    # +1 areas 100 and 50, intersection 50: IoU exactly 0.5.
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [0.0, 0.0, 9.0, 4.0]])
    scores = torch.tensor([0.9, 0.8])
    assert nms(boxes, scores, 0.5, plus_one=True, suppress_equal=True).tolist() == [0]
    assert nms(boxes, scores, 0.5, plus_one=True, suppress_equal=False).tolist() == [0, 1]


def test_nms_tie_goes_to_lower_index_and_prefix() -> None:
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0]] * 3 + [[50.0, 50.0, 60.0, 60.0]])
    scores = torch.tensor([0.5, 0.7, 0.7, 0.1])
    for plus_one in (True, False):
        assert nms(boxes, scores, 0.5, plus_one=plus_one, suppress_equal=plus_one).tolist() == [
            1,
            3,
        ]
    big_boxes, big_scores = _nms_cases(4, 1500)
    full = nms(
        torch.from_numpy(big_boxes),
        torch.from_numpy(big_scores),
        0.7,
        plus_one=True,
        suppress_equal=True,
    )
    head = nms(
        torch.from_numpy(big_boxes),
        torch.from_numpy(big_scores),
        0.7,
        plus_one=True,
        suppress_equal=True,
        max_output=300,
    )
    assert head.tolist() == full[:300].tolist()


def test_nms_empty_input() -> None:
    empty = nms(torch.zeros(0, 4), torch.zeros(0), 0.7, plus_one=True, suppress_equal=True)
    assert empty.shape == (0,) and empty.dtype == torch.int64


def test_keep_min_size_conventions() -> None:
    # Sides (+1 convention): 16, 15, 17; (no +1): 15, 14, 16.
    boxes = torch.tensor([[0.0, 0.0, 15.0, 15.0], [0.0, 0.0, 14.0, 30.0], [5.0, 5.0, 21.0, 21.0]])
    assert keep_min_size(boxes, 16.0, plus_one=True, inclusive=True).tolist() == [0, 2]
    assert keep_min_size(boxes, 16.0, plus_one=True, inclusive=False).tolist() == [2]
    assert keep_min_size(boxes, 15.0, plus_one=False, inclusive=True).tolist() == [0, 2]
    assert keep_min_size(boxes, 0.0, plus_one=False, inclusive=False).tolist() == [0, 1, 2]


@pytest.mark.gpu
@pytest.mark.parametrize("flavour", [(True, True), (False, False)])
def test_nms_cuda_equals_reference(flavour) -> None:
    plus_one, suppress_equal = flavour
    boxes, scores = _nms_cases(5, 2000)
    scores = (np.round(scores * 8) / 8).astype(np.float32)  # ties: CUDA sorts must not matter
    got = nms(
        torch.from_numpy(boxes).cuda(),
        torch.from_numpy(scores).cuda(),
        0.7,
        plus_one=plus_one,
        suppress_equal=suppress_equal,
    )
    assert got.device.type == "cuda"
    want = reference_nms(boxes, scores, 0.7, plus_one=plus_one, suppress_equal=suppress_equal)
    assert got.cpu().tolist() == want
