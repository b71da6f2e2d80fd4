"""Building a trainable Detector: spec, anchors, initial weights, frozen stages, BN statistics.

Also the conversion between the training parameterisation and the canonical file: the class-
specific box predictor is trained on targets divided by ``bbox_target_stds`` (Caffe's
BBOX_NORMALIZE_TARGETS) and saved multiplied back, so canonical files hold raw deltas that
decode with weights (1, 1, 1, 1), as the released caffemodels do (reference §1.5).

Shape glossary:
    B   calibration images (cropped to one size)
    R   calibration RoIs
    K   object classes (K+1 rows in the box predictor, 4 columns each)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from butd.detector.anchors import caffe_cell_anchors
from butd.detector.config import ModelSpec
from butd.detector.model import Detector
from butd.detector.train.configs import TrainConfig

logger = logging.getLogger(__name__)

BBOX_PRED_KEYS = ("roi_heads.bbox_pred.weight", "roi_heads.bbox_pred.bias")
DEMO_DESCRIPTION = (
    "butd demo model: {arch} trained from scratch on butd synthetic scenes (coloured shapes), "
    "NOT on Visual Genome; {k} shape classes, {a} attributes; config {name}"
)


def build_spec(
    config: TrainConfig, objects_vocab: Sequence[str], attributes_vocab: Sequence[str]
) -> ModelSpec:
    """ModelSpec of a run: the config's arch sized to the vocabularies, its conventions."""
    arch = dataclasses.replace(
        config.arch,
        num_classes=len(objects_vocab),
        num_attributes=len(attributes_vocab),
        num_anchors=len(config.anchor_ratios) * len(config.anchor_scales),
    )
    if config.name == "demo":
        description = DEMO_DESCRIPTION.format(
            arch="narrow ResNet C4",
            k=len(objects_vocab),
            a=len(attributes_vocab),
            name=config.name,
        )
    else:
        description = f"butd trained with config {config.name}"
    return ModelSpec(
        arch=arch,
        conventions=config.conventions,
        objects_vocab=tuple(objects_vocab),
        attributes_vocab=tuple(attributes_vocab),
        description=description,
        extraction_defaults=dict(config.extraction_defaults),
    )


def init_weights(model: Detector, config: TrainConfig, seed: int) -> None:
    """Caffe fillers for the new layers (Gaussian std 0.01, box 0.001, zero biases), He-normal
    convolutions for a backbone trained from scratch, and the config's cell anchors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.normal_(0.0, (2.0 / fan_out) ** 0.5, generator=gen)
            if isinstance(module, nn.Conv2d | nn.Linear) and module.bias is not None:
                module.bias.zero_()
        heads = model.roi_heads
        for layer, std in (
            (model.rpn.conv, 0.01),
            (model.rpn.objectness, 0.01),
            (model.rpn.deltas, 0.01),
            (heads.cls_score, 0.01),
            (heads.bbox_pred, 0.001),
            (heads.attr.fc, 0.01),
            (heads.attr.score, 0.01),
            (heads.attr.embedding, 0.01),
        ):
            layer.weight.normal_(0.0, std, generator=gen)
        anchors = caffe_cell_anchors(16, config.anchor_ratios, config.anchor_scales)
        cell = model.rpn.cell_anchors
        assert isinstance(cell, torch.Tensor)
        cell.copy_(anchors)


def freeze_stages(model: Detector, freeze_at: int) -> list[str]:
    """Turns off gradients of the stem (1), res2 (2), res3 (3); returns the frozen names."""
    stages = [model.backbone.stem, model.backbone.res2, model.backbone.res3][:freeze_at]
    frozen = []
    for stage in stages:
        for p in stage.parameters():
            p.requires_grad_(False)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            frozen.append(name)
    return frozen


@torch.no_grad()
def calibrate_frozen_bn(model: Detector, images: torch.Tensor, rois: torch.Tensor) -> int:
    """Sets every frozen BN's statistics to those of its input on a batch (data-dependent init).

    A model trained from scratch has no ImageNet statistics; each FrozenBatchNorm2d is set, in
    forward order, to mean / variance of what reaches it (weight 1, bias 0), so the stored
    network normalises its activations as a pretrained one would. Statistics stay frozen after.

    Args:
        images: (B, 3, H, W) prepared images.
        rois: (R, 5) [batch index, x1, y1, x2, y2] boxes for the res5 statistics.

    Returns:
        The number of BN layers set.
    """
    done: list[int] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not isinstance(module, FrozenBatchNorm2d) or id(module) in done:
            return
        x = inputs[0].transpose(0, 1).reshape(inputs[0].shape[1], -1)  # (C, B*H*W)
        module.running_mean.copy_(x.mean(dim=1))
        module.running_var.copy_(x.var(dim=1).clamp(min=1e-4))
        module.weight.fill_(1.0)
        module.bias.fill_(0.0)
        done.append(id(module))

    handles = [
        m.register_forward_pre_hook(hook)
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        res4 = model.backbone(images)
        model.roi_heads.pooled_features(res4, rois)
    finally:
        for h in handles:
            h.remove()
    logger.info("calibrated %d frozen BN layers on %d images", len(done), images.shape[0])
    return len(done)


def export_scale(config: TrainConfig) -> tuple[float, float, float, float]:
    """Per-coordinate factor from the trained box predictor to the canonical one.

    The canonical predictor's output is divided by ``conventions.bbox_reg_weights`` at decode
    time, and must then equal the raw delta that the trained output times the target std is:
    canonical = trained x std x weight (Caffe weights 1: the stds alone).
    """
    s = config.bbox_target_stds
    w = config.conventions.bbox_reg_weights
    return (s[0] * w[0], s[1] * w[1], s[2] * w[2], s[3] * w[3])


def _std_vector(stds: Sequence[float], rows: int) -> torch.Tensor:
    """(rows,) = stds repeated per class: the scale of each output of the box predictor."""
    return torch.tensor(list(stds), dtype=torch.float32).repeat(rows // 4)


def to_canonical(
    state: Mapping[str, torch.Tensor], stds: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Training state dict -> canonical (box predictor multiplied by the target stds)."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for key in BBOX_PRED_KEYS:
        scale = _std_vector(stds, out[key].shape[0]).to(out[key].device)
        out[key] = out[key] * (scale[:, None] if out[key].dim() == 2 else scale)
    return out


def from_canonical(
    state: Mapping[str, torch.Tensor], stds: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Canonical state dict -> training parameterisation (inverse of ``to_canonical``)."""
    out = {k: v.detach().clone() for k, v in state.items()}
    for key in BBOX_PRED_KEYS:
        scale = _std_vector(stds, out[key].shape[0]).to(out[key].device)
        out[key] = out[key] / (scale[:, None] if out[key].dim() == 2 else scale)
    return out
