"""MSRA-style ResNet C4 trunk, as in the Caffe bottom-up model (reference §1.2, §14 step 4).

Shape glossary:
    B   images in a batch (all of one resized shape; no padding)
    H,W resized image height and width
    C0  stem channels (64)
    C4  res4 channels (1024 for ResNet-101)

Differences from torchvision's ResNet, each one required for Caffe equivalence:
    * the stride of a downsampling block sits in the 1x1 ``conv1`` (and the shortcut), not in the
      3x3;
    * the stem max-pool is k3 s2 with padding 0 and ceil mode;
    * every BatchNorm is frozen (``FrozenBatchNorm2d``, eps 1e-5), stats used verbatim.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d

from butd.detector.config import ArchConfig

BN_EPS = 1e-5  # Caffe BatchNorm default


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block with frozen BN; stride in the first 1x1."""

    def __init__(
        self, in_ch: int, width: int, out_ch: int, *, stride: int = 1, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, stride=stride, bias=False)
        self.bn1 = FrozenBatchNorm2d(width, eps=BN_EPS)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = FrozenBatchNorm2d(width, eps=BN_EPS)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = FrozenBatchNorm2d(out_ch, eps=BN_EPS)
        self.shortcut: nn.Conv2d | None = None
        self.shortcut_bn: FrozenBatchNorm2d | None = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            self.shortcut_bn = FrozenBatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_ch, H, W) -> (B, out_ch, H/stride, W/stride)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x
        if self.shortcut is not None and self.shortcut_bn is not None:
            identity = self.shortcut_bn(self.shortcut(x))
        return F.relu(out + identity)


def make_stage(
    in_ch: int, width: int, blocks: int, *, stride: int, dilation: int = 1
) -> nn.Sequential:
    """``blocks`` bottlenecks; the first changes channels (and strides), the rest keep them."""
    out_ch = width * 4
    layers = [Bottleneck(in_ch, width, out_ch, stride=stride, dilation=dilation)]
    layers += [Bottleneck(out_ch, width, out_ch, dilation=dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """conv1 7x7/2 (no bias) -> frozen BN -> ReLU -> max-pool k3 s2 p0 ceil (Caffe pool1)."""

    def __init__(self, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, out_ch, 7, stride=2, padding=3, bias=False)
        self.bn = FrozenBatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C0, ceil((ceil(H/2) - 3) / 2) + 1, ...)."""
        x = F.relu(self.bn(self.conv(x)))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """Stem + res2..res4: image batch to the stride-16 map read by the RPN and RoI pooling."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        w = arch.stage_widths
        n = arch.stage_blocks
        self.stem = Stem(arch.stem_channels)
        self.res2 = make_stage(arch.stem_channels, w[0], n[0], stride=1)
        self.res3 = make_stage(w[0] * 4, w[1], n[1], stride=2)
        self.res4 = make_stage(w[1] * 4, w[2], n[2], stride=2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) mean-subtracted BGR -> res4 (B, C4, ~H/16, ~W/16) after ReLU."""
        return self.res4(self.res3(self.res2(self.stem(images))))


def make_res5(arch: ArchConfig) -> nn.Sequential:
    """res5 run on pooled RoIs: every stride 1, every 3x3 dilated (Caffe: dilation 2, 14x14 out)."""
    return make_stage(
        arch.res4_channels,
        arch.stage_widths[3],
        arch.stage_blocks[3],
        stride=1,
        dilation=arch.res5_dilation,
    )
