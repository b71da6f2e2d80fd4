"""One image's training losses: backbone -> RPN targets and losses -> proposals -> RoI sampling
-> Fast R-CNN and attribute losses.

Shape glossary:
    Hs,Ws  resized image size
    Hf,Wf  res4 map size
    M   anchors (Hf * Wf * A)
    P   proposals
    R   sampled RoIs (F foreground first)
    D   feature size
"""

from __future__ import annotations

import math

import torch

from butd.detector.anchors import grid_anchors
from butd.detector.model import Detector
from butd.detector.model.rpn import ProposalSettings, propose
from butd.detector.train.configs import TrainConfig
from butd.detector.train.dataset import TrainSample
from butd.detector.train.losses import attribute_loss, fast_rcnn_losses, rpn_losses
from butd.detector.train.targets import anchor_targets, attribute_labels, sample_rois

LOSS_NAMES = ("rpn_cls", "rpn_box", "cls", "box", "attr")
# Clamp on dw/dh while decoding training proposals, so an untrained RPN cannot overflow exp().
LOG_MAX_RATIO = math.log(1000.0 / 16)


def proposal_settings(config: TrainConfig) -> ProposalSettings:
    """The proposal layer at training time (TRAIN.RPN_* top-k and IoU).

    Caffe's order (decode, clip, minimum size ``>=``, top-k, NMS, top-k) whatever the weights'
    conventions; dw/dh clamped so an untrained RPN cannot overflow exp(); torchvision's NMS
    flavour (no +1, IoU > thresh): training only needs good proposals, not the test-time
    bit-exact NMS.
    """
    conv = config.conventions
    return ProposalSettings(
        pre_nms_topk=config.rpn_pre_nms_topk,
        post_nms_topk=config.rpn_post_nms_topk,
        nms_thresh=config.rpn_nms_thresh,
        plus_one=conv.plus_one,
        delta_clamp=LOG_MAX_RATIO,
        min_size=conv.rpn_min_size,
        min_size_scaled=conv.rpn_min_size_scaled,
        min_size_inclusive=True,
        topk_before_clip=False,
        nms_plus_one=False,
        nms_suppress_equal=False,
    )


@torch.no_grad()
def training_proposals(
    model: Detector,
    objectness: torch.Tensor,
    deltas: torch.Tensor,
    anchors: torch.Tensor,
    sample: TrainSample,
    config: TrainConfig,
) -> torch.Tensor:
    """Proposals of one image for RoI sampling, from the head's maps (the RPN's own layer).

    Args:
        objectness: (1, 2A or A, Hf, Wf) and deltas (1, 4A, Hf, Wf): ``model.rpn.head``.
        anchors: (M, 4) ``grid_anchors`` of the map.

    Returns:
        (P, 4) float32 in resized pixels.
    """
    scores, flat_deltas = model.rpn.flat_outputs(objectness, deltas)  # (1, M), (1, M, 4)
    settings = proposal_settings(config)
    return propose(anchors, flat_deltas[0], scores[0], sample.size, sample.scale, settings)


def _rpn_part(
    model: Detector,
    res4: torch.Tensor,
    sample: TrainSample,
    config: TrainConfig,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(objectness loss, box loss, proposals (P, 4)) of one image."""
    objectness, deltas = model.rpn.head(res4)  # (1, 2A|A, Hf, Wf), (1, 4A, Hf, Wf)
    hf, wf = objectness.shape[2:]
    cell = model.rpn.cell_anchors
    assert isinstance(cell, torch.Tensor)
    anchors = grid_anchors(cell, hf, wf, model.rpn.feature_stride)  # (M, 4)
    targets = anchor_targets(
        anchors.cpu(),
        sample.gt_boxes,
        sample.size,
        batch_size=config.rpn_batch_size,
        fg_fraction=config.rpn_fg_fraction,
        pos_iou=config.rpn_pos_iou,
        neg_iou=config.rpn_neg_iou,
        allowed_border=config.rpn_allowed_border,
        plus_one=config.conventions.plus_one,
        generator=generator,
    )
    device = res4.device
    cls, box = rpn_losses(
        objectness[0],
        deltas[0],
        targets.labels.to(device),
        targets.deltas.to(device),
        num_anchors=anchors.shape[0] // (hf * wf),
        layout=config.conventions.rpn_score,
    )
    proposals = training_proposals(model, objectness, deltas, anchors, sample, config)
    return cls, box, proposals


def training_losses(
    model: Detector, sample: TrainSample, config: TrainConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """Unweighted-by-caller losses of one image (the attribute loss already carries its 0.5).

    Args:
        model: the detector in training parameterisation (box predictor on normalised
            targets, see ``butd.detector.train.init``).
        sample: one prepared image with ground truth.
        config: targets, sampling and loss settings.
        generator: random source of the anchor / RoI / attribute sampling.

    Returns:
        {"rpn_cls", "rpn_box", "cls", "box", "attr"} scalar tensors.
    """
    device = next(model.parameters()).device
    res4 = model.backbone(sample.image[None].to(device))  # (1, C4, Hf, Wf)
    rpn_cls, rpn_box, proposals = _rpn_part(model, res4, sample, config, generator)
    rt = sample_rois(
        proposals.cpu(),
        sample.gt_boxes,
        sample.gt_classes,
        batch_size=config.roi_batch_size,
        fg_fraction=config.roi_fg_fraction,
        fg_iou=config.fg_iou,
        bg_iou_hi=config.bg_iou_hi,
        bg_iou_lo=config.bg_iou_lo,
        plus_one=config.conventions.plus_one,
        generator=generator,
    )
    rois = torch.cat([torch.zeros(len(rt.rois), 1), rt.rois], dim=1).to(device)  # (R, 5)
    features = model.roi_heads.pooled_features(res4, rois)  # (R, D)
    cls_logits, box_deltas = model.roi_heads.predict(features)
    stds = torch.tensor(config.bbox_target_stds, dtype=torch.float32)
    labels = rt.labels.to(device)
    cls, box = fast_rcnn_losses(cls_logits, box_deltas, labels, (rt.deltas / stds).to(device))
    attr_targets = attribute_labels(
        sample.gt_attributes,
        rt.gt_index[: rt.num_fg],
        sampling=config.attr_sampling,
        generator=generator,
    ).to(device)
    fg = slice(0, rt.num_fg)
    attr_logits = model.roi_heads.attr(features[fg], labels[fg])  # ground-truth class embedding
    attr = config.attr_loss_weight * attribute_loss(attr_logits, attr_targets)
    return {"rpn_cls": rpn_cls, "rpn_box": rpn_box, "cls": cls, "box": box, "attr": attr}
