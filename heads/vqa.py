"""Up-Down VQA head (Anderson et al. 2018; Teney et al. 2018) and the question encoder.

Shape glossary:
    B   questions
    K   regions (padded); mask (B, K)
    D   region feature size (2048)
    L   question tokens (14, left-padded)
    Q   GRU size (512 in the paper, 1024 in hengyuan-hu)
    H   joint hidden size
    N   candidate answers (3129 on VQA v2)

Two variants chosen by ``VQAConfig.variant``:
    "paper":     gated-tanh layers f(x) = tanh(Wx+b) ∘ σ(W'x+b'), concatenation attention
                 a_i = w_aᵀ f_a([v_i; q]), output s = W_o f_o(h);
    "hengyuan":  weight-normed Linear + ReLU layers, product attention
                 a_i = wᵀ Dropout(ReLU(W_v v_i) ∘ ReLU(W_q q)), classifier
                 WN(H→2H) → ReLU → Dropout .5 → WN(2H→N).
Both fuse h = f_q(q) ∘ f_v(v̂) and return logits for the multi-label sigmoid (BCE on soft scores).
``attention="mean"`` replaces the top-down attention by the masked mean (the no-attention control).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from butd.heads.cbam import grid_cbam
from butd.heads.layers import Activation, masked_softmax, nonlinear_fc, wn_linear
from butd.heads.regions import RegionBatch
from butd.heads.vocab import PAD


@dataclass(frozen=True)
class VQAConfig:
    """Sizes and variant of the Up-Down VQA head (defaults: the paper, heads-reference §3)."""

    variant: str = "paper"  # paper (gated tanh) | hengyuan (ReLU + weight norm)
    attention: str = "top_down"  # top_down | mean (control)
    feature_dim: int = 2048  # D
    embed_dim: int = 300  # GloVe-300 word vectors
    question_dim: int = 512  # GRU hidden (hengyuan-hu: 1024)
    hidden_dim: int = 512  # joint space (hengyuan-hu: 1024)
    dropout: float = 0.2  # attention dropout (hengyuan variant only)
    classifier_dropout: float = 0.5  # hengyuan variant only
    grid_size: int = 0  # G > 0: the K inputs are G*G grid cells (docs/grids.md); 0: regions
    cbam: bool = False  # refine grid features with CBAM before the attention (butd.heads.cbam)


@dataclass(frozen=True)
class VQAOutput:
    """logits (B, N); attention (B, K) for Up-Down, (B, G, K, L) for BAN."""

    logits: torch.Tensor
    attention: torch.Tensor


class QuestionEncoder(nn.Module):
    """Word embedding + 1-layer GRU over left-padded tokens (hengyuan-hu ``QuestionEmbedding``)."""

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) left-padded -> all GRU outputs (B, L, Q); [:, -1] is the last word."""
        out, _ = self.gru(self.embed(tokens))
        return out


class UpDownVQA(nn.Module):
    """One-glimpse top-down attention, product fusion, sigmoid classifier."""

    def __init__(self, vocab_size: int, num_answers: int, cfg: VQAConfig) -> None:
        super().__init__()
        if cfg.variant not in ("paper", "hengyuan"):
            raise ValueError(f"variant must be 'paper' or 'hengyuan'; got {cfg.variant!r}")
        self.cfg = cfg
        act: Activation = "gated_tanh" if cfg.variant == "paper" else "relu"
        d, q, h = cfg.feature_dim, cfg.question_dim, cfg.hidden_dim
        self.question = QuestionEncoder(vocab_size, cfg.embed_dim, q)
        if cfg.variant == "paper":
            self.att_fc = nonlinear_fc(d + q, h, act)
        else:
            self.att_v = nonlinear_fc(d, h, act)
            self.att_q = nonlinear_fc(q, h, act)
            self.att_drop = nn.Dropout(cfg.dropout)
        self.att_score = wn_linear(h, 1) if cfg.variant == "hengyuan" else nn.Linear(h, 1)
        self.q_net = nonlinear_fc(q, h, act)
        self.v_net = nonlinear_fc(d, h, act)
        if cfg.variant == "paper":
            self.classifier: nn.Module = nn.Sequential(
                nonlinear_fc(h, h, act), nn.Linear(h, num_answers)
            )
        else:
            self.classifier = nn.Sequential(
                nonlinear_fc(h, 2 * h, act),
                nn.Dropout(cfg.classifier_dropout),
                wn_linear(2 * h, num_answers),
            )

        _prior_bias_(self.classifier[-1], num_answers)
        self.cbam = grid_cbam(cfg.cbam, cfg.grid_size, d)

    def attend(self, v: torch.Tensor, q: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, K, D), (B, Q), (B, K) -> α (B, K), 0 on padded regions."""
        if self.cfg.attention == "mean":
            return mask.to(v.dtype) / mask.sum(1, keepdim=True).to(v.dtype)
        q_k = q.unsqueeze(1).expand(-1, v.shape[1], -1)
        if self.cfg.variant == "paper":
            joint = self.att_fc(torch.cat([v, q_k], dim=-1))  # (B, K, H)
        else:
            joint = self.att_drop(self.att_v(v) * self.att_q(q_k))
        return masked_softmax(self.att_score(joint).squeeze(-1), mask)

    def forward(self, regions: RegionBatch, questions: torch.Tensor) -> VQAOutput:
        """regions (B, K, D) + mask, questions (B, L) left-padded -> logits (B, N)."""
        q = self.question(questions)[:, -1]  # (B, Q)
        v = regions.features if self.cbam is None else self.cbam(regions.features)
        alpha = self.attend(v, q, regions.mask)
        v_hat = torch.bmm(alpha.unsqueeze(1), v).squeeze(1)  # (B, D)
        joint = self.q_net(q) * self.v_net(v_hat)  # (B, H)
        return VQAOutput(self.classifier(joint), alpha)


def _prior_bias_(layer: nn.Module, num_answers: int) -> None:
    """Start every answer at p = 1/N instead of 1/2: with BCE × N the first updates otherwise
    drive the gated-tanh layers into their dead zone while they learn the prior (seen on the
    synthetic benchmark: the paper variant collapsed to a constant answer)."""
    bias = getattr(layer, "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.fill_(-math.log(max(num_answers - 1, 1)))


def vqa_bce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """BCEWithLogits(mean) × N = sum over answers, mean over questions (heads-reference §11)."""
    loss = nn.functional.binary_cross_entropy_with_logits(logits, targets)
    return loss * targets.shape[1]
