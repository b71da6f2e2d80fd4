"""Proposals: one layer (``butd.detector.model.rpn.propose``) for training and inference.

* Training proposals against the NumPy port of Caffe's proposal layer (tests.unit.caffe_reference)
  with the training recipe's two changes: dw/dh clamped at log(1000/16), torchvision's NMS
  flavour (no +1 areas, suppression only at IoU > thresh). Test-time proposals against the
  unchanged port are checked in test_model.py.
* One layer: where the training settings and the weights' conventions coincide, training
  proposals are exactly the RPN's test-time output.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from butd.detector.anchors import grid_anchors
from butd.detector.config import DETECTRON2_DELTA_CLAMP, Conventions, ExtractionConfig
from butd.detector.model import Detector
from butd.detector.model.rpn import ProposalSettings
from butd.detector.train.configs import demo_config
from butd.detector.train.dataset import TrainSample
from butd.detector.train.step import LOG_MAX_RATIO, proposal_settings, training_proposals
from tests.tiny_weights import random_detector, tiny_spec
from tests.unit.caffe_reference import caffe_proposals

IMG_H, IMG_W, SCALE = 125, 170, 0.85


def _sample() -> TrainSample:
    return TrainSample(
        image=torch.zeros(3, IMG_H, IMG_W),
        scale=SCALE,
        gt_boxes=torch.tensor([[10.0, 10.0, 60.0, 50.0]]),
        gt_classes=torch.tensor([1]),
        gt_attributes=torch.tensor([[-1]]),
        image_id=0,
    )


def _maps(model: Detector, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(res4, objectness, deltas) of a random 8x11 res4 map."""
    gen = torch.Generator().manual_seed(seed)
    res4 = torch.randn(1, model.spec.arch.res4_channels, 8, 11, generator=gen)
    with torch.no_grad():
        objectness, deltas = model.rpn.head(res4)
    return res4, objectness, deltas


def test_training_proposals_are_caffes_layer_with_the_training_changes() -> None:
    model = random_detector(seed=2)
    _, objectness, deltas = _maps(model, 0)
    deltas = deltas * 8  # an untrained RPN's wild deltas: some dw/dh pass the clamp
    assert (deltas.view(-1, 4, 8, 11)[:, 2:] > LOG_MAX_RATIO).any()
    config = demo_config().replace(rpn_pre_nms_topk=400, rpn_post_nms_topk=60)
    anchors = grid_anchors(model.rpn.cell_anchors, 8, 11, model.rpn.feature_stride)
    ours = training_proposals(model, objectness, deltas, anchors, _sample(), config).numpy()
    args = (objectness.numpy(), deltas.numpy(), IMG_H, IMG_W, SCALE, config)
    expected = caffe_proposals(*args, clamp=LOG_MAX_RATIO, nms_flavour="torchvision")
    assert ours.shape == expected.shape and len(ours) > 10
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)
    # The NMS flavour matters on these maps, so the comparison above can tell it apart.
    test_time = caffe_proposals(*args, clamp=LOG_MAX_RATIO)
    assert test_time.shape != expected.shape or not np.allclose(test_time, expected, atol=1e-3)


def test_training_and_inference_run_the_same_proposal_layer() -> None:
    # The weights' conventions that make inference settings equal the training recipe's.
    conv = Conventions(
        plus_one=False,
        nms_suppress_equal=False,
        delta_clamp=DETECTRON2_DELTA_CLAMP,
        rpn_min_size_inclusive=True,
        rpn_topk_before_clip=False,
    )
    model = random_detector(tiny_spec(conv), seed=4)
    train_config = demo_config().replace(
        conventions=conv, rpn_pre_nms_topk=500, rpn_post_nms_topk=80, rpn_nms_thresh=0.6
    )
    test_config = ExtractionConfig(rpn_pre_nms_topk=500, rpn_post_nms_topk=80, rpn_nms_thresh=0.6)
    assert proposal_settings(train_config) == ProposalSettings.for_inference(conv, test_config)
    res4, objectness, deltas = _maps(model, 1)
    anchors = grid_anchors(model.rpn.cell_anchors, 8, 11, model.rpn.feature_stride)
    trained = training_proposals(model, objectness, deltas, anchors, _sample(), train_config)
    with torch.no_grad():
        tested = model.rpn(res4, [(IMG_H, IMG_W)], [SCALE], test_config)[0]
    assert len(tested) > 10 and torch.equal(trained, tested)
    # Under Caffe's conventions the two differ only in the NMS flavour and the clamp.
    caffe = dataclasses.asdict(ProposalSettings.for_inference(Conventions(), test_config))
    train = dataclasses.asdict(proposal_settings(train_config.replace(conventions=Conventions())))
    assert {k for k in caffe if caffe[k] != train[k]} == {
        "delta_clamp",
        "nms_plus_one",
        "nms_suppress_equal",
    }
