"""select_regions against the NumPy loop of generate_tsv.py (reference §1.6): exact equality."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from butd.detector.select import Selection, select_regions
from tests.unit.reference_nms import reference_keep, reference_max_conf, reference_select


def _proposals(rng: np.random.Generator, r: int, clustered: bool) -> np.ndarray:
    """Boxes in a 640 x 480 image; clustered ones overlap like RPN proposals around objects."""
    if clustered:
        centres = rng.uniform([40, 40], [600, 440], (max(r // 20, 1), 2))
        ctr = centres[rng.integers(0, len(centres), r)] + rng.normal(0, 15, (r, 2))
        half = rng.uniform(10, 90, (r, 2))
    else:
        ctr = rng.uniform([0, 0], [640, 480], (r, 2))
        half = rng.uniform(2, 120, (r, 2))
    boxes = np.concatenate([ctr - half, ctr + half], axis=1)
    return np.clip(boxes, 0, [639, 479, 639, 479]).astype(np.float32)


def _probabilities(rng: np.random.Generator, r: int, k: int, spread: float) -> np.ndarray:
    """Softmax of random logits over K + 1 columns, half of the rows peaked on one class."""
    logits = rng.normal(0, spread, (r, k + 1))
    peaked = rng.random(r) < 0.5
    logits[peaked, rng.integers(0, k + 1, int(peaked.sum()))] += 6.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _objects(rng: np.random.Generator, r: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Proposals around r/20 objects whose proposals share the object's two likeliest classes."""
    n_obj = max(r // 20, 1)
    obj = rng.integers(0, n_obj, r)
    ctr = rng.uniform([40, 40], [600, 440], (n_obj, 2))[obj] + rng.normal(0, 15, (r, 2))
    half = rng.uniform(10, 90, (r, 2))
    boxes = np.clip(np.concatenate([ctr - half, ctr + half], axis=1), 0, [639, 479, 639, 479])
    labels = rng.integers(1, k + 1, (n_obj, 2))
    logits = rng.normal(0, 2.0, (r, k + 1))
    logits[np.arange(r), labels[obj, 0]] += rng.uniform(2.0, 8.0, r)
    logits[np.arange(r), labels[obj, 1]] += rng.uniform(0.0, 5.0, r)
    logits[rng.random(r) < 0.2, 0] += 6.0
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return boxes.astype(np.float32), (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def _check(boxes: np.ndarray, probs: np.ndarray, **kw) -> Selection:
    got = select_regions(torch.from_numpy(boxes), torch.from_numpy(probs), **kw)
    want_idx, want_conf = reference_select(boxes, probs, **kw)
    assert got.indices.dtype == torch.int64 and got.max_conf.dtype == torch.float32
    np.testing.assert_array_equal(got.max_conf.numpy(), want_conf)
    np.testing.assert_array_equal(got.indices.numpy(), want_idx)
    return got


@pytest.mark.parametrize(
    ("seed", "r", "k", "clustered", "spread"),
    [
        (0, 1, 1, True, 1.0),
        (1, 7, 5, True, 1.0),
        (2, 60, 40, True, 2.0),
        (3, 120, 100, False, 1.0),
        (4, 200, 50, True, 0.3),
        (5, 300, 30, True, 3.0),
    ],
)
def test_random_inputs_match_loop(seed, r, k, clustered, spread) -> None:
    rng = np.random.default_rng(seed)
    _check(_proposals(rng, r, clustered), _probabilities(rng, r, k, spread))


def test_full_size_1600_classes() -> None:
    rng = np.random.default_rng(10)
    got = _check(*_objects(rng, 300, 1600))
    assert 10 <= got.indices.numel() <= 100


@pytest.mark.parametrize("seed", [21, 22, 23])
def test_correlated_classes_match_loop(seed: int) -> None:
    _check(*_objects(np.random.default_rng(seed), 160, 40))


def test_flat_scores_with_many_classes() -> None:
    # Nearly uniform rows: no box stands out, the pruning has little to work with.
    rng = np.random.default_rng(11)
    _check(_proposals(rng, 150, True), _probabilities(rng, 150, 400, 0.05), conf_thresh=0.0)


def test_tied_scores_and_duplicate_boxes() -> None:
    rng = np.random.default_rng(12)
    boxes = _proposals(rng, 80, True)
    probs = np.round(_probabilities(rng, 80, 30, 1.0) * 20) / 20  # ties everywhere
    boxes[40:60], probs[40:60] = boxes[0:20], probs[0:20]  # duplicated proposals and rows
    _check(boxes, probs.astype(np.float32), min_boxes=5, max_boxes=50)


def test_all_equal_scores() -> None:
    rng = np.random.default_rng(13)
    boxes = _proposals(rng, 50, True)
    probs = np.full((50, 21), 1 / 21, dtype=np.float32)
    got = _check(boxes, probs)
    assert got.indices.numel() == 10  # all below 0.2: the ten best, ties by index


def test_degenerate_boxes() -> None:
    rng = np.random.default_rng(14)
    boxes = _proposals(rng, 60, True)
    boxes[:10, 2:] = boxes[:10, :2] - 1.0  # zero area under +1
    boxes[10:15, 2:] = boxes[10:15, :2] - 7.0  # negative size
    boxes[15:20] = boxes[20]  # duplicates of one box
    probs = _probabilities(rng, 60, 25, 1.0)
    _check(boxes, probs)
    _check(boxes, probs, plus_one=False, suppress_equal=False)


def test_count_below_min_and_above_max() -> None:
    rng = np.random.default_rng(15)
    boxes = _proposals(rng, 120, False)
    probs = _probabilities(rng, 120, 12, 1.0)
    want_conf = reference_max_conf(boxes, probs)

    def run(conf_thresh: float, max_boxes: int) -> Selection:
        got = select_regions(
            torch.from_numpy(boxes), torch.from_numpy(probs), conf_thresh=conf_thresh,
            max_boxes=max_boxes,
        )  # fmt: skip
        np.testing.assert_array_equal(got.max_conf.numpy(), want_conf.astype(np.float32))
        want = reference_keep(want_conf, conf_thresh, 10, max_boxes)
        np.testing.assert_array_equal(got.indices.numpy(), want)
        return got

    below = run(0.999, 100)
    assert below.indices.numel() == 10
    conf = below.max_conf[below.indices]
    assert torch.all(conf[:-1] >= conf[1:])  # sorted by max_conf
    assert run(0.0, 30).indices.numel() == 30
    assert run(0.0, 120).indices.tolist() == list(range(120))  # proposal order when in range


def test_fewer_proposals_than_min_and_empty() -> None:
    rng = np.random.default_rng(16)
    few = _check(_proposals(rng, 4, True), _probabilities(rng, 4, 10, 1.0))
    assert sorted(few.indices.tolist()) == [0, 1, 2, 3]
    empty = select_regions(torch.zeros(0, 4), torch.zeros(0, 11))
    assert empty.indices.shape == (0,) and empty.max_conf.shape == (0,)


def test_modern_flavour_and_thresholds() -> None:
    rng = np.random.default_rng(17)
    boxes, probs = _proposals(rng, 100, True), _probabilities(rng, 100, 30, 2.0)
    _check(boxes, probs, plus_one=False, suppress_equal=False, nms_thresh=0.5)
    _check(boxes, probs, nms_thresh=0.7, conf_thresh=0.05, min_boxes=36, max_boxes=36)


def test_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="boxes must be"):
        select_regions(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="cls_prob must be"):
        select_regions(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="NaN"):
        select_regions(torch.zeros(1, 4), torch.full((1, 3), float("nan")))


@pytest.mark.gpu
def test_cuda_equals_cpu() -> None:
    boxes, probs = _objects(np.random.default_rng(18), 300, 1600)
    cpu = select_regions(torch.from_numpy(boxes), torch.from_numpy(probs))
    gpu = select_regions(torch.from_numpy(boxes).cuda(), torch.from_numpy(probs).cuda())
    assert gpu.indices.device.type == "cuda"
    assert torch.equal(gpu.indices.cpu(), cpu.indices)
    assert torch.equal(gpu.max_conf.cpu(), cpu.max_conf)


def test_small_batches_and_weak_start_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    import butd.detector.select as select_module

    # Tiny batches, no free lower bound, one class per box per round: many rounds and batches.
    monkeypatch.setattr(select_module, "_BATCH_ELEMENTS", 300)
    monkeypatch.setattr(select_module, "_SURE_CLASSES", 1)
    monkeypatch.setattr(select_module, "_GROWTH", 2)
    rng = np.random.default_rng(19)
    _check(_proposals(rng, 90, True), _probabilities(rng, 90, 60, 1.5))


def test_pruning_skips_classes(caplog: pytest.LogCaptureFixture) -> None:
    rng = np.random.default_rng(20)
    boxes, probs = _objects(rng, 300, 1600)
    with caplog.at_level("DEBUG", logger="butd.detector.select"):
        select_regions(torch.from_numpy(boxes), torch.from_numpy(probs))
    message = next(r.getMessage() for r in caplog.records if "classes solved" in r.getMessage())
    solved = int(message.split()[2])
    assert solved < 1600 // 4, message
