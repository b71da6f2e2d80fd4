"""Small building blocks shared by the heads: masked softmax/mean, gated tanh, FC stacks.

Shape glossary:
    B   batch
    K   regions (padded)
    D   input size
    H   output size
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

Activation = Literal["gated_tanh", "relu"]


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax with masked entries filled with -inf first, so they get exactly 0.

    Args:
        logits: (..., K) scores.
        mask: boolean, broadcastable to ``logits``; True = keep.
        dim: the softmax axis.
    """
    return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, K, D), (B, K) -> (B, D) mean over the real rows."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class GatedTanh(nn.Module):
    """y = tanh(W x + b) ∘ σ(W' x + b') (Anderson et al. / Teney et al.)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return torch.tanh(self.fc(x)) * torch.sigmoid(self.gate(x))


class ReluFC(nn.Module):
    """Dropout -> weight-normed Linear -> ReLU (hengyuan-hu / BAN ``FCNet``)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = weight_norm(nn.Linear(in_dim, out_dim), dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in_dim) -> (..., out_dim)."""
        return torch.relu(self.fc(self.drop(x)))


def nonlinear_fc(
    in_dim: int, out_dim: int, activation: Activation, dropout: float = 0.0
) -> nn.Module:
    """The non-linear layer f(x) of the VQA heads: gated tanh (paper) or WN-Linear + ReLU."""
    if activation == "gated_tanh":
        return GatedTanh(in_dim, out_dim)
    if activation == "relu":
        return ReluFC(in_dim, out_dim, dropout)
    raise ValueError(f"activation must be 'gated_tanh' or 'relu'; got {activation!r}")


def wn_linear(in_dim: int, out_dim: int) -> nn.Module:
    """Weight-normed Linear (no activation)."""
    return weight_norm(nn.Linear(in_dim, out_dim), dim=None)
