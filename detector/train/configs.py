"""Named training configurations: ``demo`` (CPU, synthetic scenes) and ``vg-r101`` (the paper).

``vg-r101`` follows the released Caffe recipe of peteanderson80/bottom-up-attention:
``models/vg/ResNet-101/faster_rcnn_end2end_final/{solver,train}.prototxt``,
``experiments/cfgs/faster_rcnn_end2end_resnet.yml`` and the py-faster-rcnn defaults it leaves
untouched (``lib/fast_rcnn/config.py``); each value says where it comes from.

``demo`` is the same code path shrunk to train from scratch on 2 CPU cores in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from butd.detector.config import ArchConfig, Conventions, tiny_arch

AttrSampling = Literal["first", "random"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides the data. Lengths in iterations."""

    name: str
    arch: ArchConfig
    conventions: Conventions = field(default_factory=Conventions)
    # Cell anchors (ratio-major, Caffe generate_anchors): ratios h/w and scales of the 16-px
    # base box (Caffe: 4, 8, 16, 32 -> 64..512 px).
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    anchor_scales: tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
    # Training scale: short side / long-side cap in pixels (TRAIN.SCALES=(600,), MAX_SIZE 1000).
    min_size: int = 600
    max_size: int = 1000
    # Horizontal flips (TRAIN.USE_FLIPPED): each iteration flips its image with probability 0.5.
    flip: bool = True
    # Images per optimiser step (IMS_PER_BATCH: 1 per GPU).
    ims_per_batch: int = 1
    # RPN targets (anchor_target_layer): anchors sampled per image, their foreground share,
    # IoU >= pos is foreground, < neg background (RPN_BATCHSIZE 64 in the VG yml; default 256).
    rpn_batch_size: int = 64
    rpn_fg_fraction: float = 0.5
    rpn_pos_iou: float = 0.7
    rpn_neg_iou: float = 0.3
    # Anchors may cross the image border by this many pixels (TRAIN.RPN_ALLOWED_BORDER... 0).
    rpn_allowed_border: float = 0.0
    # Training proposals (TRAIN.RPN_PRE_NMS_TOP_N 12000, POST 2000, NMS 0.7).
    rpn_pre_nms_topk: int = 12000
    rpn_post_nms_topk: int = 2000
    rpn_nms_thresh: float = 0.7
    # RoI sampling (proposal_target_layer): RoIs per image, foreground share, IoU >= fg_iou is
    # foreground, [bg_lo, bg_hi) background (BATCH_SIZE 64, FG_FRACTION 0.5, BG_THRESH_LO 0).
    roi_batch_size: int = 64
    roi_fg_fraction: float = 0.5
    fg_iou: float = 0.5
    bg_iou_hi: float = 0.5
    bg_iou_lo: float = 0.0
    # Box targets are divided by these stds in training (BBOX_NORMALIZE_TARGETS_PRECOMPUTED);
    # the saved weights are multiplied back, so checkpoints hold raw deltas (weights 1,1,1,1).
    bbox_target_stds: tuple[float, float, float, float] = (0.1, 0.1, 0.2, 0.2)
    # Attribute loss weight (train.prototxt loss_attr: 0.5) and which of an object's several
    # attributes is the softmax target: "first" in file order, or "random" (uniform, resampled
    # at every iteration, so the softmax spreads over the object's attributes).
    attr_loss_weight: float = 0.5
    attr_sampling: AttrSampling = "random"
    # Stages without gradients: 0 none, 1 stem, 2 stem + res2, 3 + res3 (train.prototxt has
    # lr_mult 0 on conv1..res3; detectron2's FREEZE_AT=2 stops at res2).
    freeze_at: int = 3
    # Data-dependent initialisation of the frozen BN statistics from training images: only for
    # training from scratch (no ImageNet statistics to start from).
    calibrate_bn: bool = False
    # SGD (solver.prototxt): learning rate, momentum, weight decay; biases get 2x lr and no
    # decay (Caffe lr_mult 2 on InnerProduct biases).
    base_lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0005
    # Linear warm-up from warmup_factor * base_lr over warmup_iters, then x gamma at each step.
    warmup_iters: int = 0
    warmup_factor: float = 1.0 / 3
    steps: tuple[int, ...] = (350_000,)
    gamma: float = 0.1
    max_iter: int = 380_000
    # Clip the global gradient norm (None = off, as Caffe).
    clip_grad_norm: float | None = None
    # Checkpoint every this many iterations (and at the end).
    checkpoint_every: int = 10_000
    # Seed of data order, flips and target sampling.
    seed: int = 0
    # ExtractionConfig fields stored with the weights (ModelSpec.extraction_defaults).
    extraction_defaults: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def demo_arch(num_classes: int = 6, num_attributes: int = 10) -> ArchConfig:
    """The demo network: ``tiny_arch`` with 7x7 RoI pooling (about 0.19 M parameters).

    7x7 instead of 14x14 pooling makes res5 on the sampled RoIs 4x cheaper, which is what lets
    the demo train on two shared CPU cores; the code path is the same (``pooled_size``).
    """
    return dataclasses.replace(tiny_arch(num_classes, num_attributes), pooled_size=7)


def demo_config(num_classes: int = 6, num_attributes: int = 10) -> TrainConfig:
    """CPU-sized training from scratch on ``butd synth`` scenes (160-256 px images)."""
    return TrainConfig(
        name="demo",
        arch=demo_arch(num_classes, num_attributes),
        # Objects are 30-100 px: anchors of 32, 64, 128, 256 px.
        anchor_scales=(2.0, 4.0, 8.0, 16.0),
        min_size=192,
        max_size=320,
        rpn_batch_size=128,
        rpn_pre_nms_topk=2000,
        rpn_post_nms_topk=300,
        roi_batch_size=64,
        roi_fg_fraction=0.25,
        freeze_at=0,
        calibrate_bn=True,
        base_lr=0.02,
        weight_decay=0.0001,
        warmup_iters=200,
        warmup_factor=0.01,
        steps=(5600, 6500),
        max_iter=7000,
        clip_grad_norm=10.0,
        checkpoint_every=500,
        seed=1,
        extraction_defaults={"min_size": 192, "max_size": 320},
    )


def vg_r101_config() -> TrainConfig:
    """The published recipe: ResNet-101, 1600 objects, 400 attributes, 380k iterations."""
    return TrainConfig(name="vg-r101", arch=ArchConfig())


CONFIGS = {"demo": demo_config, "vg-r101": vg_r101_config}


def get_config(name: str) -> TrainConfig:
    """A named configuration.

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    if name not in CONFIGS:
        raise KeyError(f"unknown training config {name!r}; known: {sorted(CONFIGS)}")
    return CONFIGS[name]()
