"""Frozen configuration of the detector: architecture, weight-file conventions, extraction.

Three dataclasses, each with one job:

* ``ArchConfig``: the shape of the network (what a state dict must fit). Stored with weights.
* ``Conventions``: the numerical conventions the weights were trained or converted under
  (box decode, NMS flavour, RPN order, score layout). They are data carried by each converted
  checkpoint, never branches chosen by file type. Stored with weights.
* ``ExtractionConfig``: how an image becomes regions at test time (scales, thresholds, box
  counts, precision). Chosen by the caller; part of ``model_version``.

Defaults reproduce the original Caffe ``generate_tsv.py`` pipeline (reference §1, §14).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any, Literal

Precision = Literal["fp32", "fp16", "bf16"]
RpnScore = Literal["softmax2", "sigmoid"]
AttrScore = Literal["softmax_all", "softmax_without_none"]


@dataclass(frozen=True)
class ArchConfig:
    """Shape of a ResNet C4 Faster R-CNN with an attribute head.

    Defaults are the published bottom-up model (ResNet-101, 1600 objects, 400 attributes).
    """

    # Bottleneck blocks per stage res2..res5 (ResNet-101: 3, 4, 23, 3).
    stage_blocks: tuple[int, int, int, int] = (3, 4, 23, 3)
    # Output channels of the 7x7 stem conv.
    stem_channels: int = 64
    # Inner (bottleneck) width of res2..res5; each stage outputs 4x this.
    stage_widths: tuple[int, int, int, int] = (64, 128, 256, 512)
    # Channels of the RPN's 3x3 conv (Caffe rpn_conv/3x3: 512).
    rpn_channels: int = 512
    # Number of anchors per feature-map cell (12 = 3 ratios x 4 scales).
    num_anchors: int = 12
    # Object classes K, background excluded (Visual Genome: 1600).
    num_classes: int = 1600
    # Attributes A, "no attribute" excluded (Visual Genome: 400).
    num_attributes: int = 400
    # Size of the class embedding fed to the attribute head (Caffe cls_embedding: 256).
    attr_embed_dim: int = 256
    # Hidden size of the attribute head (Caffe fc_attr: 512).
    attr_hidden: int = 512
    # RoI pooling output side (Caffe roi_pool5: 14x14).
    pooled_size: int = 14
    # Stride of res4, the map the RPN and RoI pooling read (16 px).
    feature_stride: int = 16
    # Dilation of every 3x3 conv in res5 (Caffe: 2, stride 1, so res5 keeps 14x14).
    res5_dilation: int = 2

    @property
    def feature_dim(self) -> int:
        """D: channels of res5, the pooled region feature size (2048 for ResNet-101)."""
        return self.stage_widths[3] * 4

    @property
    def res4_channels(self) -> int:
        """Channels of the res4 map read by the RPN and RoI pooling (1024)."""
        return self.stage_widths[2] * 4


@dataclass(frozen=True)
class Conventions:
    """Numerical conventions a checkpoint runs under (reference §8, §14).

    The defaults are Caffe's. The cell anchors themselves are a tensor stored with the weights
    (``rpn.cell_anchors``), already in the order of the RPN's output channels.
    """

    # Legacy "+1" box convention: width = x2 - x1 + 1 in decode, IoU and size filters, and
    # clipping to [0, W-1]. Caffe and MILVLG: True; detectron2 / HF: False.
    plus_one: bool = True
    # NMS suppresses a box when IoU >= thresh (Caffe cpu_nms) rather than IoU > thresh
    # (torchvision).
    nms_suppress_equal: bool = True
    # Clamp on dw/dh before exp(); None = no clamp (Caffe). detectron2: log(1000/16).
    delta_clamp: float | None = None
    # RPN objectness layout: "softmax2" = 2A channels, background block first, softmax over the
    # pair (Caffe, MILVLG); "sigmoid" = A logits (detectron2, HF).
    rpn_score: RpnScore = "softmax2"
    # RPN minimum proposal side in input pixels, multiplied by the image scale when
    # ``rpn_min_size_scaled`` (Caffe: 16 * s). detectron2: 0, unscaled.
    rpn_min_size: float = 16.0
    rpn_min_size_scaled: bool = True
    # Keep a proposal whose side equals the minimum (Caffe ``>=``); MILVLG keeps only ``>``.
    rpn_min_size_inclusive: bool = True
    # detectron2 takes the pre-NMS top-k by score before clipping; Caffe clips and filters first.
    rpn_topk_before_clip: bool = False
    # Weights dividing the class-specific box deltas (Caffe snapshots hold raw deltas: 1,1,1,1;
    # detectron2: 10,10,5,5).
    bbox_reg_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
    # Attribute probabilities: the 401-way softmax (Caffe, MILVLG) or a softmax over the 400 real
    # attributes with "no attribute" dropped first (airsplay / HF).
    attr_score: AttrScore = "softmax_all"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conventions:
        data = dict(data)
        data["bbox_reg_weights"] = tuple(data.get("bbox_reg_weights", (1.0, 1.0, 1.0, 1.0)))
        return cls(**data)


DETECTRON2_DELTA_CLAMP = math.log(1000.0 / 16)


# Largest grid side: 32 x 32 cells is already finer than res4 itself on a 600-pixel image.
MAX_GRID_SIZE = 32


@dataclass(frozen=True)
class ExtractionConfig:
    """Test-time behaviour: image in, regions out. Part of ``model_version``."""

    # Caffe TEST.SCALES: target length of the short side, pixels.
    min_size: int = 600
    # Caffe TEST.MAX_SIZE: cap on the long side, pixels (checked after np.round, §1.1).
    max_size: int = 1000
    # BGR pixel means subtracted before resizing (Caffe PIXEL_MEANS); no std division.
    pixel_mean: tuple[float, float, float] = (102.9801, 115.9465, 122.7717)
    # RPN: proposals kept before NMS (TEST.RPN_PRE_NMS_TOP_N), after NMS
    # (TEST.RPN_POST_NMS_TOP_N), and the NMS IoU (TEST.RPN_NMS_THRESH).
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_thresh: float = 0.7
    # Selection (generate_tsv.py): per-class NMS IoU (TEST.NMS), confidence threshold on max_conf,
    # and the clamp on the number of regions.
    nms_thresh: float = 0.3
    conf_thresh: float = 0.2
    min_boxes: int = 10
    max_boxes: int = 100
    # "fp32" is the reference (TF32 off); "fp16"/"bf16" autocast on CUDA, deviation documented.
    precision: Precision = "fp32"
    # Grid features from the same pass: res5 run over the whole res4 map, average-pooled to
    # grid_size x grid_size cells of D channels (docs/grids.md). 0 = regions only. Left out of
    # ``to_json`` (and so of ``model_version``) when 0, so region-only versions do not move.
    grid_size: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(
                f"need 1 <= min_boxes <= max_boxes; got {self.min_boxes}, {self.max_boxes}"
            )
        if not 0.0 <= self.conf_thresh <= 1.0:
            raise ValueError(f"conf_thresh must be in [0, 1]; got {self.conf_thresh}")
        if self.precision not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be fp32, fp16 or bf16; got {self.precision!r}")
        if not 0 <= self.grid_size <= MAX_GRID_SIZE:
            raise ValueError(f"grid_size must be in [0, {MAX_GRID_SIZE}]; got {self.grid_size}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not self.grid_size:
            del data["grid_size"]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExtractionConfig:
        data = dict(data)
        data["pixel_mean"] = tuple(data.get("pixel_mean", cls.pixel_mean))
        return cls(**data)

    def replace(self, **changes: Any) -> ExtractionConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ModelSpec:
    """Everything a checkpoint carries besides tensors: shape, conventions, vocabularies."""

    arch: ArchConfig = field(default_factory=ArchConfig)
    conventions: Conventions = field(default_factory=Conventions)
    objects_vocab: tuple[str, ...] = ()
    attributes_vocab: tuple[str, ...] = ()
    # Human-readable description of what these weights are ("Caffe VG 10-100", "demo ...").
    description: str = ""
    # ExtractionConfig fields these weights expect by default (e.g. a demo model trained at a
    # small input scale: {"min_size": 192, "max_size": 320}); a caller's explicit config wins.
    extraction_defaults: dict[str, Any] = field(default_factory=dict)

    def default_extraction(self) -> ExtractionConfig:
        """ExtractionConfig() with this checkpoint's ``extraction_defaults`` applied."""
        return ExtractionConfig.from_json(
            {**ExtractionConfig().to_json(), **self.extraction_defaults}
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": dataclasses.asdict(self.arch),
            "conventions": self.conventions.to_json(),
            "objects_vocab": list(self.objects_vocab),
            "attributes_vocab": list(self.attributes_vocab),
            "description": self.description,
            "extraction_defaults": dict(self.extraction_defaults),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelSpec:
        arch = dict(data["arch"])
        arch["stage_blocks"] = tuple(arch["stage_blocks"])
        arch["stage_widths"] = tuple(arch["stage_widths"])
        return cls(
            arch=ArchConfig(**arch),
            conventions=Conventions.from_json(data["conventions"]),
            objects_vocab=tuple(data.get("objects_vocab", ())),
            attributes_vocab=tuple(data.get("attributes_vocab", ())),
            description=str(data.get("description", "")),
            extraction_defaults=dict(data.get("extraction_defaults", {})),
        )


def model_version(weights_sha256: str, extraction: ExtractionConfig) -> str:
    """Cache key of everything that determines stored features: 16 hex chars.

    ``precision`` is included: fp16 features are not the fp32 reference.
    """
    payload = json.dumps(
        {"weights": weights_sha256, "extraction": extraction.to_json()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def tiny_arch(num_classes: int = 8, num_attributes: int = 6) -> ArchConfig:
    """A narrow configuration of the same network, for tests and the demo model.

    Same code path (bottleneck C4, RPN, RoI pool, dilated res5, attribute head), about 1/8 of the
    channels and one block per stage.
    """
    return ArchConfig(
        stage_blocks=(1, 1, 1, 1),
        stem_channels=16,
        stage_widths=(8, 16, 32, 64),
        rpn_channels=32,
        num_anchors=12,
        num_classes=num_classes,
        num_attributes=num_attributes,
        attr_embed_dim=16,
        attr_hidden=32,
        pooled_size=14,
        feature_stride=16,
        res5_dilation=2,
    )
