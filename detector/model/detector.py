"""The bottom-up detector, composed as in the paper's diagram: backbone -> RPN -> RoI head.

Shape glossary:
    B   images in a batch (all of one resized shape, unpadded)
    P   proposals of one image (<= 300)
    D   feature size (2048)
    K   object classes (K+1 logits, background at 0)
    At  attributes (At+1 logits, "no attribute" at 0)
    G   grid side of the optional grid features (cells G x G)

The network takes a tensor batch and returns raw tensors; selection of the 10–100 regions and
conversion to original-image pixels live in ``detector.select`` and ``detector.extractor``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from detector.config import ExtractionConfig, ModelSpec
from detector.model.backbone import Backbone
from detector.model.roi_heads import RoIHeads
from detector.model.rpn import RPN


@dataclass(frozen=True)
class RegionOutputs:
    """Raw outputs for the regions of one image.

    Attributes:
        boxes: (P, 4) float32 regions in resized-image pixels (proposals or given boxes).
        features: (P, D) pooled res5 features.
        cls_logits: (P, K+1) class logits, background at 0.
        attr_logits: (P, At+1) attribute logits, "no attribute" at 0.
    """

    boxes: torch.Tensor
    features: torch.Tensor
    cls_logits: torch.Tensor
    attr_logits: torch.Tensor

    def __post_init__(self) -> None:
        p = self.boxes.shape[0]
        for name in ("features", "cls_logits", "attr_logits"):
            value = getattr(self, name)
            if value.ndim != 2 or value.shape[0] != p:
                raise ValueError(f"{name} must be (P={p}, *); got {tuple(value.shape)}")


class Detector(nn.Module):
    """Faster R-CNN ResNet C4 with an attribute head; state dict = the canonical weight keys."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = Backbone(spec.arch)
        self.rpn = RPN(spec.arch, spec.conventions)
        self.roi_heads = RoIHeads(spec.arch)
        self.eval()

    def forward(
        self, images: torch.Tensor, scales: list[float], config: ExtractionConfig
    ) -> list[RegionOutputs]:
        """Detect regions in a batch of equally sized images.

        Args:
            images: (B, 3, H, W) mean-subtracted, resized BGR float.
            scales: resize factor of each image.
            config: RPN top-k / NMS settings.

        Returns:
            B RegionOutputs over each image's proposals.
        """
        res4 = self.backbone(images)
        return self.detect(res4, (images.shape[2], images.shape[3]), scales, config)

    def detect(
        self,
        res4: torch.Tensor,
        size: tuple[int, int],
        scales: list[float],
        config: ExtractionConfig,
    ) -> list[RegionOutputs]:
        """RPN and RoI head over a backbone map res4 (B, C4, Hf, Wf) of images of ``size``."""
        proposals = self.rpn(res4, [size] * res4.shape[0], scales, config)
        return self.regions(res4, proposals)

    def grid(self, res4: torch.Tensor, grid_size: int) -> torch.Tensor:
        """Grid features: the RoI head's res5 over the whole res4 map, average-pooled.

        res4 (B, C4, Hf, Wf) -> (B, G, G, D), G = ``grid_size``. res5 keeps stride 16 (its
        stride-1, dilated form, as on RoIs), so cells are in the region features' space; res4 is
        only read, so the regions computed from it are unchanged.
        """
        res5 = self.roi_heads.res5(res4)  # (B, D, Hf, Wf)
        pooled = F.adaptive_avg_pool2d(res5, grid_size)  # (B, D, G, G)
        return pooled.permute(0, 2, 3, 1)

    def regions(self, res4: torch.Tensor, boxes: list[torch.Tensor]) -> list[RegionOutputs]:
        """Features, class and attribute logits of given boxes (resized pixels) per image."""
        rois = _to_rois(boxes)  # (R, 5)
        features = self.roi_heads.pooled_features(res4, rois)  # (R, D)
        cls_logits, _ = self.roi_heads.predict(features)
        # Caffe's ArgMax runs over all K+1 logits, background included.
        attr_logits = self.roi_heads.attr(features, cls_logits.argmax(dim=1))
        counts = [int(b.shape[0]) for b in boxes]
        parts = zip(
            features.split(counts),
            cls_logits.split(counts),
            attr_logits.split(counts),
            strict=True,
        )
        return [
            RegionOutputs(boxes=b, features=f, cls_logits=c, attr_logits=a)
            for b, (f, c, a) in zip(boxes, parts, strict=True)
        ]


def _to_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """B tensors (P_i, 4) -> (sum P_i, 5) rows [batch index, x1, y1, x2, y2]."""
    index = torch.cat(
        [
            torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device)
            for i, b in enumerate(boxes)
        ]
    )
    return torch.cat([index, torch.cat(boxes)], dim=1)
