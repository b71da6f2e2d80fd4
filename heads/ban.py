"""Bilinear Attention Networks (Kim, Jun & Zhang, NeurIPS 2018; jnhwkim/ban-vqa).

Shape glossary:
    B   questions
    K   regions (padded); region mask (B, K)
    L   question tokens (padded); question mask (B, L)
    D   region feature size (2048)
    H   hidden size (1280 in the paper)
    G   glimpses (8)
    r   rank of the attention maps (3)
    N   candidate answers
    O   objects of the counter (10)

Differences from the reference code, on purpose (heads-reference §11): padded regions AND padded
question tokens are masked (-inf) in the joint K×L softmax and in the final sum over tokens, so
outputs do not depend on padding or on region order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from butd.heads.counter import Counter
from butd.heads.layers import ReluFC, wn_linear
from butd.heads.regions import RegionBatch
from butd.heads.vocab import PAD
from butd.heads.vqa import QuestionEncoder, VQAOutput


@dataclass(frozen=True)
class BANConfig:
    """BAN sizes (defaults: ban-vqa main.py, heads-reference §4)."""

    feature_dim: int = 2048  # D
    embed_dim: int = 300  # word vectors (the paper concatenates two GloVe-300s: 600)
    hidden_dim: int = 1280  # H, GRU size and joint size
    glimpses: int = 8  # G
    rank: int = 3  # k of the attention BCNet
    counter: bool = True  # Zhang et al. counting module
    count_objects: int = 10  # O
    dropout: float = 0.2  # before every FC
    att_dropout: float = 0.5  # on the attention's V projection
    classifier_dropout: float = 0.5


class BilinearAttention(nn.Module):
    """logits_g[i, j] = p_gᵀ (V'_i ∘ Q'_j) + b_g, V' = ReLU-FC(V), Q' = ReLU-FC(Q) in R^{rH}."""

    def __init__(self, cfg: BANConfig) -> None:
        super().__init__()
        hk = cfg.hidden_dim * cfg.rank
        self.v_net = ReluFC(cfg.feature_dim, hk, cfg.dropout)
        self.v_drop = nn.Dropout(cfg.att_dropout)
        self.q_net = ReluFC(cfg.hidden_dim, hk, cfg.dropout)
        self.h_mat = nn.Parameter(torch.randn(cfg.glimpses, hk) / hk**0.5)
        self.h_bias = nn.Parameter(torch.zeros(cfg.glimpses))

    def forward(
        self, v: torch.Tensor, q: torch.Tensor, v_mask: torch.Tensor, q_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns maps A (B, G, K, L), softmax over all K·L jointly, and the raw logits."""
        v_ = self.v_drop(self.v_net(v))  # (B, K, rH)
        q_ = self.q_net(q)  # (B, L, rH)
        logits = torch.einsum("hc,bvc,bqc->bhvq", self.h_mat, v_, q_)
        logits = logits + self.h_bias.view(1, -1, 1, 1)
        pair = (v_mask[:, :, None] & q_mask[:, None, :]).unsqueeze(1)  # (B, 1, K, L)
        b, g, k, l_ = logits.shape
        flat = logits.masked_fill(~pair, float("-inf")).view(b, g, k * l_)
        return torch.softmax(flat, -1).view(b, g, k, l_), logits


class BilinearPooling(nn.Module):
    """f[c] = Σ_i Σ_j A[i, j] · ReLU-FC(V)_i[c] · ReLU-FC(Q)_j[c] (the joint BCNet, k = 1)."""

    def __init__(self, cfg: BANConfig) -> None:
        super().__init__()
        self.v_net = ReluFC(cfg.feature_dim, cfg.hidden_dim, cfg.dropout)
        self.q_net = ReluFC(cfg.hidden_dim, cfg.hidden_dim, cfg.dropout)

    def forward(self, v: torch.Tensor, q: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """(B, K, D), (B, L, H), (B, K, L) -> (B, H)."""
        return torch.einsum("bvc,bvq,bqc->bc", self.v_net(v), att, self.q_net(q))


class BAN(nn.Module):
    """G glimpses of bilinear attention with residual updates of every question position."""

    def __init__(self, vocab_size: int, num_answers: int, cfg: BANConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_dim
        self.question = QuestionEncoder(vocab_size, cfg.embed_dim, h)
        self.attention = BilinearAttention(cfg)
        self.pool = nn.ModuleList([BilinearPooling(cfg) for _ in range(cfg.glimpses)])
        self.q_proj = nn.ModuleList(
            [nn.Sequential(nn.Dropout(cfg.dropout), wn_linear(h, h)) for _ in range(cfg.glimpses)]
        )
        self.counter = Counter(cfg.count_objects) if cfg.counter else None
        self.c_proj = nn.ModuleList(
            [
                ReluFC(cfg.count_objects + 1, h, 0.0)
                for _ in range(cfg.glimpses if cfg.counter else 0)
            ]
        )
        self.classifier = nn.Sequential(
            weight_norm(nn.Linear(h, 2 * h), dim=None),
            nn.ReLU(),
            nn.Dropout(cfg.classifier_dropout),
            weight_norm(nn.Linear(2 * h, num_answers), dim=None),
        )

    def forward(self, regions: RegionBatch, questions: torch.Tensor) -> VQAOutput:
        """regions + questions (B, L) -> logits (B, N); attention = maps (B, G, K, L)."""
        v, v_mask = regions.features, regions.mask
        q_mask = questions != PAD
        q = self.question(questions)  # (B, L, H)
        att, logits = self.attention(v, q, v_mask, q_mask)
        corners = regions.spatial[..., :4].transpose(1, 2)  # (B, 4, K) normalised x1 y1 x2 y2
        for g in range(self.cfg.glimpses):
            q = q + self.q_proj[g](self.pool[g](v, q, att[:, g])).unsqueeze(1)
            if self.counter is not None:
                region_logit = logits[:, g].masked_fill(~q_mask[:, None, :], -1e4).amax(2)
                region_logit = region_logit.masked_fill(~v_mask, -1e4)  # (B, K)
                q = q + self.c_proj[g](self.counter(corners, region_logit)).unsqueeze(1)
        pooled = (q * q_mask.unsqueeze(-1).to(q.dtype)).sum(1)  # (B, H)
        return VQAOutput(self.classifier(pooled), att)
