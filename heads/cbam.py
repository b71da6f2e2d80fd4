"""CBAM (Woo et al., ECCV 2018) as a refinement of grid features inside a head.

Shape glossary:
    B   batch
    C   channels (the feature size D)
    G   grid side; a grid arrives as K = G*G row-major cells (B, K, C)
    r   reduction ratio of the channel MLP (16 in the paper)

    M_c(F) = σ(MLP(AvgPool_hw(F)) + MLP(MaxPool_hw(F))),  MLP: C -> C/r -> C, ReLU, shared
    M_s(F) = σ(conv7x7([AvgPool_c(F); MaxPool_c(F)]))     2 -> 1 channel, padding 3
    F' = M_c(F) ⊗ F;   F'' = M_s(F') ⊗ F'                 channel first, then spatial

The paper's equations (its released code adds a BatchNorm after the 7x7 conv; a head over frozen
features trains without it). Trained with the head that holds it; not conditioned on the word
or the question. Over region sets it does not apply: a 7x7 convolution over regions depends on
their arbitrary order (heads-reference §7), so heads build it only for grid features.
"""

from __future__ import annotations

import math

import torch
from torch import nn

REDUCTION = 16  # the paper's reduction ratio r
KERNEL = 7  # the paper's spatial kernel


class CBAM(nn.Module):
    """Channel then spatial attention over a (B, C, H, W) map."""

    def __init__(self, channels: int, reduction: int = REDUCTION, kernel: int = KERNEL) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )
        self.spatial = nn.Conv2d(2, 1, kernel, padding=kernel // 2)

    def channel_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> M_c (B, C, 1, 1)."""
        avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))  # (B, C) each
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))[:, :, None, None]

    def spatial_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> M_s (B, 1, H, W)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.spatial(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F'' (B, C, H, W)."""
        x = self.channel_weights(x) * x
        return self.spatial_weights(x) * x


class GridCBAM(nn.Module):
    """CBAM applied to grid features given as cells: (B, G*G, C) -> (B, G*G, C)."""

    def __init__(self, channels: int, reduction: int = REDUCTION, kernel: int = KERNEL) -> None:
        super().__init__()
        self.block = CBAM(channels, reduction, kernel)

    def forward(self, cells: torch.Tensor) -> torch.Tensor:
        b, k, c = cells.shape
        g = math.isqrt(k)
        if g * g != k:
            raise ValueError(f"CBAM needs a square grid of cells; got K={k}")
        grid = cells.reshape(b, g, g, c).permute(0, 3, 1, 2)  # (B, C, G, G)
        return self.block(grid).permute(0, 2, 3, 1).reshape(b, k, c)


def grid_cbam(enabled: bool, grid_size: int, channels: int) -> nn.Module | None:
    """The CBAM block of a head, or None; refuses region features (``grid_size`` 0)."""
    if not enabled:
        return None
    if grid_size <= 0:
        raise ValueError("CBAM applies to grid features only (grid_size > 0), not region sets")
    return GridCBAM(channels)
