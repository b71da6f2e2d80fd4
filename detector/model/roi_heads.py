"""RoI head: RoI pooling, res5, pooled feature, class / box / attribute predictors.

Reference §1.4, §1.5, §14 steps 6–7.

Shape glossary:
    R   RoIs (proposals or given boxes) across the batch
    C4  res4 channels (1024)
    D   feature size (2048): res5 channels, mean-pooled over the 14x14 map
    K   object classes (1600); K+1 with background at index 0
    E   class-embedding size (256)
    Ha  attribute hidden size (512)
    At  attributes (400); At+1 with "no attribute" at index 0
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_pool

from butd.detector.config import ArchConfig
from butd.detector.model.backbone import make_res5


class AttributeHead(nn.Module):
    """Embed(class) ‖ feature -> fc -> ReLU -> attribute logits (Caffe cls_embedding / fc_attr)."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.embedding = nn.Embedding(arch.num_classes + 1, arch.attr_embed_dim)
        self.fc = nn.Linear(arch.feature_dim + arch.attr_embed_dim, arch.attr_hidden)
        self.score = nn.Linear(arch.attr_hidden, arch.num_attributes + 1)

    def forward(self, features: torch.Tensor, class_ids: torch.Tensor) -> torch.Tensor:
        """features (R, D), class_ids (R,) in [0, K] -> attribute logits (R, At+1).

        At test time ``class_ids`` is the arg-max over all K+1 class logits (background
        included, as Caffe's ArgMax layer); in training it is the ground-truth class.
        """
        joint = torch.cat([features, self.embedding(class_ids).to(features.dtype)], dim=1)
        return self.score(F.relu(self.fc(joint)))


class RoIHeads(nn.Module):
    """Pools RoIs from res4, runs res5 on them and predicts classes, boxes and attributes."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.pooled_size = arch.pooled_size
        self.spatial_scale = 1.0 / arch.feature_stride  # 0.0625: exact in binary
        self.res5 = make_res5(arch)
        self.cls_score = nn.Linear(arch.feature_dim, arch.num_classes + 1)
        self.bbox_pred = nn.Linear(arch.feature_dim, (arch.num_classes + 1) * 4)
        self.attr = AttributeHead(arch)

    def pooled_features(self, res4: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """res4 (B, C4, Hf, Wf), rois (R, 5) [batch index, x1, y1, x2, y2] in resized pixels
        -> (R, D) mean of res5 over the pooled map (Caffe pool5_flat, post-ReLU)."""
        return self.res5_features(self.pool(res4, rois))

    def pool(self, res4: torch.Tensor, rois: torch.Tensor) -> torch.Tensor:
        """res4 (B, C4, Hf, Wf), rois (R, 5) in resized pixels -> (R, C4, 14, 14) RoI pooling.

        Each RoI is pooled on its own, so pooling images of different shapes separately and
        concatenating gives what one call would (``Detector.regions_mixed``).
        """
        size = (self.pooled_size, self.pooled_size)
        return roi_pool(res4, rois.to(res4.dtype), size, self.spatial_scale)

    def res5_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """(R, C4, 14, 14) pooled RoIs, from any images -> (R, D) mean of res5 over the map."""
        return self.res5(pooled).mean(dim=(2, 3))

    def predict(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(R, D) -> class logits (R, K+1), class-specific box deltas (R, (K+1)*4)."""
        return self.cls_score(features), self.bbox_pred(features)
