"""Attention modules plugged into the caption decoder loop.

Shape glossary:
    B   batch (images × beams during beam search)
    K   regions (padded); ``mask`` (B, K) True on real regions
    D   region feature size (2048)
    M   query size (the LSTM state that asks)
    H   attention hidden size (512 in Up-Down)

Every module has the same two calls, so a decoder core does not care which one it holds:
``project(features) -> (B, K, H)`` once per image (cached, tiled over beams), and
``forward(query, features, projected, mask) -> (context (B, D), alpha (B, K))``.
"""

from __future__ import annotations

import torch
from torch import nn

from butd.heads.layers import masked_softmax


class AdditiveAttention(nn.Module):
    """a_i = w_aᵀ tanh(W_va v_i + W_ha h); α = masked softmax(a); v̂ = Σ α_i v_i.

    Up-Down uses it without biases over the raw D-d features (Caffe ``fc``, ``hidden_att``,
    ``predict_att``); Show-Attend-Tell's f_att has a bias.
    """

    def __init__(self, feature_dim: int, query_dim: int, hidden_dim: int, bias: bool) -> None:
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden_dim, bias=bias)
        self.query_proj = nn.Linear(query_dim, hidden_dim, bias=False)
        self.score = nn.Linear(hidden_dim, 1, bias=False)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(B, K, D) -> (B, K, H) W_va v_i, computed once per image."""
        return self.feature_proj(features)

    def logits(self, query: torch.Tensor, projected: torch.Tensor) -> torch.Tensor:
        """(B, M), (B, K, H) -> (B, K) unnormalised scores a_i."""
        hidden = torch.tanh(projected + self.query_proj(query).unsqueeze(1))  # (B, K, H)
        return self.score(hidden).squeeze(-1)

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        projected: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns context (B, D) and weights alpha (B, K), exactly 0 on padded regions."""
        alpha = masked_softmax(self.logits(query, projected), mask)
        return torch.bmm(alpha.unsqueeze(1), features).squeeze(1), alpha


class UniformAttention(nn.Module):
    """The no-attention control: α_i = 1/N on the N real regions (mean pooling)."""

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Nothing to cache: (B, K, 0)."""
        return features[..., :0]

    def forward(
        self,
        query: torch.Tensor,
        features: torch.Tensor,
        projected: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the masked mean (B, D) and the uniform weights (B, K)."""
        alpha = mask.to(features.dtype) / mask.sum(1, keepdim=True).to(features.dtype)
        return torch.bmm(alpha.unsqueeze(1), features).squeeze(1), alpha


def build_attention(kind: str, feature_dim: int, query_dim: int, hidden_dim: int) -> nn.Module:
    """``"additive"`` (no bias, Up-Down), ``"additive_bias"`` (SAT) or ``"uniform"`` (control)."""
    if kind == "additive":
        return AdditiveAttention(feature_dim, query_dim, hidden_dim, bias=False)
    if kind == "additive_bias":
        return AdditiveAttention(feature_dim, query_dim, hidden_dim, bias=True)
    if kind == "uniform":
        return UniformAttention()
    raise ValueError(f"attention must be additive, additive_bias or uniform; got {kind!r}")
