"""Training: targets, losses against hand computations, schedule, learning, checkpoint/resume,
and a checkpoint that loads with the canonical loader and runs in the Extractor."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from butd.detector.boxes import decode_boxes
from butd.detector.config import Conventions
from butd.detector.synth import write_synthetic_set
from butd.detector.train.configs import TrainConfig, demo_config, get_config
from butd.detector.train.init import export_scale, from_canonical, to_canonical
from butd.detector.train.losses import fast_rcnn_losses, rpn_losses, smooth_l1
from butd.detector.train.targets import anchor_targets, attribute_labels, sample_rois
from butd.detector.train.trainer import Trainer, learning_rate
from butd.detector.train.vg import Vocab, load_vg


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: these small convolutions only lose time to thread hand-offs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_set(tmp_path_factory.mktemp("synth"), 4, 11).out


def _small(config: TrainConfig) -> TrainConfig:
    return config.replace(
        rpn_pre_nms_topk=300,
        rpn_post_nms_topk=50,
        roi_batch_size=16,
        rpn_batch_size=32,
        warmup_iters=0,
        checkpoint_every=1000,
    )


def _trainer(root: Path, out: Path, config: TrainConfig) -> Trainer:
    ov = Vocab.from_file(root / "objects_vocab.txt")
    av = Vocab.from_file(root / "attributes_vocab.txt")
    return Trainer(config, load_vg(root), ov.names, av.names, out)


def test_anchor_targets_follow_the_caffe_rules() -> None:
    anchors = torch.tensor(
        [
            [0, 0, 9, 9],  # identical to GT: IoU 1 -> fg
            [0, 0, 9, 19],  # IoU 100/200 = .5: neither -> ignored (-1)
            [50, 50, 59, 59],  # IoU 0 -> bg
            [90, 90, 129, 129],  # crosses the 100-px border -> ignored
            [60, 0, 99, 39],  # best anchor of GT 2 (IoU 400/1600 = .25 < .3) -> fg anyway
        ],
        dtype=torch.float32,
    )
    gt = torch.tensor([[0, 0, 9, 9], [70, 0, 79, 19]], dtype=torch.float32)
    t = anchor_targets(
        anchors,
        gt,
        (100, 100),
        batch_size=10,
        fg_fraction=0.5,
        pos_iou=0.7,
        neg_iou=0.3,
        allowed_border=0.0,
        plus_one=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert t.labels.tolist() == [1, -1, 0, -1, 1]
    # Targets decode the fg anchors onto their ground truth (Caffe's bbox_transform_inv puts
    # x2 at ctr + w/2 without the -1 that bbox_transform's widths assume: one pixel further).
    fg = t.labels == 1
    back = decode_boxes(anchors[fg], t.deltas[fg], plus_one=True)
    torch.testing.assert_close(back, gt + torch.tensor([0.0, 0, 1, 1]), rtol=0, atol=1e-4)
    assert (t.deltas[~fg] == 0).all()
    # Subsampling keeps at most fg_fraction * batch foreground and fills up with background.
    many = torch.tensor([[0, 0, 9, 9]] * 6 + [[50, 50, 59, 59]] * 6, dtype=torch.float32)
    t = anchor_targets(
        many,
        gt[:1],
        (100, 100),
        batch_size=4,
        fg_fraction=0.5,
        pos_iou=0.7,
        neg_iou=0.3,
        allowed_border=0.0,
        plus_one=True,
        generator=torch.Generator().manual_seed(0),
    )
    assert (t.labels == 1).sum() == 2 and (t.labels == 0).sum() == 2


def test_sample_rois_puts_foreground_first_with_ground_truth_labels() -> None:
    gt = torch.tensor([[0, 0, 19, 19], [40, 40, 79, 79]], dtype=torch.float32)
    classes = torch.tensor([3, 5])
    proposals = torch.tensor(
        [[1, 1, 19, 19], [42, 40, 79, 79], [100, 100, 120, 120], [0, 0, 39, 39]],
        dtype=torch.float32,
    )
    rt = sample_rois(
        proposals,
        gt,
        classes,
        batch_size=8,
        fg_fraction=0.5,
        fg_iou=0.5,
        bg_iou_hi=0.5,
        bg_iou_lo=0.0,
        plus_one=True,
        generator=torch.Generator().manual_seed(0),
    )
    # 2 proposals + 2 GT boxes are foreground; [0,0,39,39] (IoU .25) and the far box are bg.
    assert rt.num_fg == 4 and len(rt.rois) == 6
    assert sorted(rt.labels[:4].tolist()) == [3, 3, 5, 5] and rt.labels[4:].tolist() == [0, 0]
    back = decode_boxes(rt.rois[:4], rt.deltas[:4], plus_one=True) - torch.tensor([0.0, 0, 1, 1])
    torch.testing.assert_close(back, gt[rt.gt_index[:4]], rtol=0, atol=1e-4)


def test_attribute_labels_first_random_and_ignore() -> None:
    attrs = torch.tensor([[4, 2, -1], [-1, -1, -1], [7, -1, -1]])
    index = torch.tensor([0, 1, 2, 0])
    gen = torch.Generator().manual_seed(0)
    assert attribute_labels(attrs, index, sampling="first", generator=gen).tolist() == [5, -1, 8, 5]
    seen = set()
    for _ in range(50):
        lab = attribute_labels(attrs, index, sampling="random", generator=gen)
        assert lab[1] == -1 and lab[2] == 8
        seen.add(int(lab[0]))
    assert seen == {5, 3}


def test_losses_match_hand_computation() -> None:
    x = torch.tensor([-2.0, -0.05, 0.0, 0.1, 1.5])
    # sigma 3: quadratic below 1/9, linear above.
    expected = [
        2 - 0.5 / 9,
        0.5 * 9 * 0.0025,
        0.0,
        0.5 * 9 * 0.01,
        1.5 - 0.5 / 9,
    ]
    torch.testing.assert_close(smooth_l1(x, 3.0), torch.tensor(expected))
    # RPN, A = 2 anchors on a 1x2 map: channels [bg a0, bg a1, fg a0, fg a1].
    obj = torch.randn(4, 1, 2)
    deltas = torch.randn(8, 1, 2)
    labels = torch.tensor([1, -1, 0, 1])  # rows (w0,a0), (w0,a1), (w1,a0), (w1,a1)
    targets = torch.randn(4, 4)
    cls, box = rpn_losses(obj, deltas, labels, targets, num_anchors=2, layout="softmax2")
    ref_cls, ref_box = 0.0, 0.0
    for row, (w, a) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        if labels[row] < 0:
            continue
        pair = torch.stack([obj[a, 0, w], obj[2 + a, 0, w]])
        ref_cls += -F.log_softmax(pair, 0)[labels[row]]
        if labels[row] == 1:
            pred = deltas[4 * a : 4 * a + 4, 0, w]
            ref_box += smooth_l1(pred - targets[row], 3.0).sum()
    torch.testing.assert_close(cls, ref_cls / 3)
    torch.testing.assert_close(box, ref_box / 3)
    # Fast R-CNN: only the labelled class's 4 columns of foreground rows count; / R.
    logits, box_deltas = torch.randn(3, 4), torch.randn(3, 16)
    lab, tgt = torch.tensor([2, 0, 3]), torch.randn(3, 4)
    cls, box = fast_rcnn_losses(logits, box_deltas, lab, tgt)
    torch.testing.assert_close(cls, F.cross_entropy(logits, lab))
    ref = (
        smooth_l1(box_deltas[0, 8:12] - tgt[0], 1.0).sum()
        + smooth_l1(box_deltas[2, 12:16] - tgt[2], 1.0).sum()
    )
    torch.testing.assert_close(box, ref / 3)


def test_schedule_warmup_and_steps() -> None:
    cfg = demo_config().replace(
        base_lr=0.1, warmup_iters=10, warmup_factor=0.1, steps=(20, 30), gamma=0.1
    )
    assert learning_rate(cfg, 0) == pytest.approx(0.01)
    assert learning_rate(cfg, 5) == pytest.approx(0.1 * (0.1 * 0.5 + 0.5))
    assert learning_rate(cfg, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 20) == pytest.approx(0.01)
    assert learning_rate(cfg, 35) == pytest.approx(0.001)
    assert get_config("vg-r101").arch.num_classes == 1600
    with pytest.raises(KeyError, match="known"):
        get_config("nope")


def test_canonical_box_predictor_holds_raw_deltas() -> None:
    weight, bias = torch.randn(8, 5), torch.randn(8)
    state = {"roi_heads.bbox_pred.weight": weight, "roi_heads.bbox_pred.bias": bias}
    stds = (0.1, 0.1, 0.2, 0.2)
    canon = to_canonical(state, stds)
    x = torch.randn(3, 5)
    trained = x @ weight.T + bias  # normalised deltas
    raw = x @ canon["roi_heads.bbox_pred.weight"].T + canon["roi_heads.bbox_pred.bias"]
    torch.testing.assert_close(raw, trained * torch.tensor(stds).repeat(2))
    back = from_canonical(canon, stds)
    torch.testing.assert_close(back["roi_heads.bbox_pred.weight"], weight)
    # Caffe conventions decode raw deltas: the stds alone; detectron2's weights (10, 10, 5, 5)
    # undo the stds exactly.
    assert export_scale(demo_config()) == stds
    d2 = demo_config().replace(conventions=Conventions(bbox_reg_weights=(10.0, 10.0, 5.0, 5.0)))
    assert export_scale(d2) == pytest.approx((1.0, 1.0, 1.0, 1.0))


def test_short_training_lowers_the_loss(synth_root: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _small(demo_config()).replace(base_lr=0.01, flip=False)
    trainer = _trainer(synth_root, tmp_path, cfg)
    trainer.images = trainer.images[:1]  # one image, seen every step
    trainer.start()
    totals = [trainer.step()["total"] for _ in range(16)]
    assert np.mean(totals[-4:]) < 0.85 * np.mean(totals[:4]), totals


def test_resume_continues_the_same_run(synth_root: Path, tmp_path: Path) -> None:
    cfg = _small(demo_config()).replace(base_lr=0.005, warmup_iters=3, max_iter=4)
    straight = _trainer(synth_root, tmp_path / "a", cfg)
    straight.start()
    for _ in range(4):
        straight.step()
    first = _trainer(synth_root, tmp_path / "b", cfg)
    first.start()
    first.step()
    first.step()
    first.checkpoint()
    resumed = _trainer(synth_root, tmp_path / "b", cfg)
    resumed.start(resume=True)
    assert resumed.iteration == 2
    assert resumed.optimizer is not None and first.optimizer is not None
    momentum = [s["momentum_buffer"] for s in resumed.optimizer.state.values()]
    expected = [s["momentum_buffer"] for s in first.optimizer.state.values()]
    assert len(momentum) == len(expected) > 0
    for m, e in zip(momentum, expected, strict=True):
        torch.testing.assert_close(m, e, rtol=0, atol=0)
    resumed.train(progress=False)
    assert resumed.iteration == 4
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_checkpoint_loads_canonically_and_extracts(synth_root: Path, tmp_path: Path) -> None:
    from butd.detector.extractor import Extractor
    from butd.detector.weights import load
    from butd.images import decode_image

    cfg = _small(demo_config()).replace(max_iter=1)
    trainer = _trainer(synth_root, tmp_path, cfg)
    trainer.start()
    result = trainer.train(progress=False)
    loaded = load(result.weights)
    assert loaded.spec.objects_vocab[:2] == ("circle", "square")
    assert "NOT on Visual Genome" in loaded.spec.description
    assert loaded.spec.extraction_defaults == {"min_size": 192, "max_size": 320}
    assert loaded.spec.arch.num_attributes == 10
    torch.testing.assert_close(
        loaded.state_dict["rpn.cell_anchors"][5], torch.tensor([-24.0, -24.0, 39.0, 39.0])
    )  # a = ratio 1 * 4 + scale 4 (idx 1): 64 px, Caffe generate_anchors
    ext = Extractor.from_weights(result.weights)
    image = decode_image((synth_root / "images" / "000001.jpg").read_bytes())
    record = ext.extract([image], ["a"])[0]
    assert 10 <= record.num_boxes <= 100 and record.feature_dim == 256
    assert record.objects_id.max() < 6 and record.attrs_id.max() < 10
