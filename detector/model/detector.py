"""The bottom-up detector, composed as in the paper's diagram: backbone -> RPN -> RoI head.

Shape glossary:
    B   images in a backbone batch (all of one resized shape, unpadded)
    G   shape groups sharing one RoI head call (``regions_mixed``)
    P   proposals of one image (<= 300)
    D   feature size (2048)
    K   object classes (K+1 logits, background at 0)
    At  attributes (At+1 logits, "no attribute" at 0)
    G   grid side of the optional grid features (cells G x G)

The network takes a tensor batch and returns raw tensors; selection of the 10–100 regions and
conversion to original-image pixels live in ``butd.detector.select`` and
``butd.detector.extractor``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from butd.detector.config import ExtractionConfig, ModelSpec
from butd.detector.model.backbone import Backbone
from butd.detector.model.roi_heads import RoIHeads
from butd.detector.model.rpn import RPN


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
        return self.regions(*self.propose(images, scales, config))

    def propose(
        self, images: torch.Tensor, scales: list[float], config: ExtractionConfig
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Backbone and RPN of equally sized images (unpadded).

        Args:
            images: (B, 3, H, W) mean-subtracted, resized BGR float.
            scales: resize factor of each image.
            config: RPN top-k / NMS settings.

        Returns:
            res4 (B, C4, H/16, W/16) and B proposal tensors (P, 4) in resized pixels.
        """
        res4 = self.backbone(images)
        sizes = [(images.shape[2], images.shape[3])] * images.shape[0]
        return res4, self.rpn(res4, sizes, scales, config)

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
        return self.regions_mixed([(res4, boxes)])[0]

    def regions_mixed(
        self, maps: Sequence[tuple[torch.Tensor, list[torch.Tensor]]]
    ) -> list[list[RegionOutputs]]:
        """The RoI head of images of different shapes in one call.

        RoI pooling reads each shape group's own res4 map; the pooled RoIs of all groups then
        share one res5 and predictor pass (92 % of the work, indifferent to image shape), so a
        batch of mixed shapes fills the device without padding any backbone input.

        Args:
            maps: per shape group, res4 (B_g, C4, Hf_g, Wf_g) and B_g box tensors (P, 4) in
                that group's resized pixels.

        Returns:
            Per group, B_g RegionOutputs, in the order given.
        """
        pooled = torch.cat([self.roi_heads.pool(res4, _to_rois(b)) for res4, b in maps])
        features = self.roi_heads.res5_features(pooled)  # (R, D), R over all groups
        cls_logits, _ = self.roi_heads.predict(features)
        # Caffe's ArgMax runs over all K+1 logits, background included.
        attr_logits = self.roi_heads.attr(features, cls_logits.argmax(dim=1))
        boxes = [b for _, group in maps for b in group]
        counts = [int(b.shape[0]) for b in boxes]
        parts = zip(
            features.split(counts),
            cls_logits.split(counts),
            attr_logits.split(counts),
            strict=True,
        )
        flat = [
            RegionOutputs(boxes=b, features=f, cls_logits=c, attr_logits=a)
            for b, (f, c, a) in zip(boxes, parts, strict=True)
        ]
        sizes = [len(group) for _, group in maps]
        starts = [sum(sizes[:g]) for g in range(len(sizes))]
        return [flat[s : s + n] for s, n in zip(starts, sizes, strict=True)]


def _to_rois(boxes: list[torch.Tensor]) -> torch.Tensor:
    """B tensors (P_i, 4) -> (sum P_i, 5) rows [batch index, x1, y1, x2, y2]."""
    index = torch.cat(
        [
            torch.full((b.shape[0], 1), i, dtype=b.dtype, device=b.device)
            for i, b in enumerate(boxes)
        ]
    )
    return torch.cat([index, torch.cat(boxes)], dim=1)
