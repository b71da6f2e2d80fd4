"""Caption decoder cores: Up-Down, Show-Attend-Tell (soft) and adaptive attention.

Shape glossary:
    B   batch (images × beams during beam search)
    K   regions (padded); mask (B, K)
    D   region feature size (2048)
    M   LSTM size (1000 in Up-Down)
    H   attention hidden size (512)
    E   word embedding size (1000)
    V   vocabulary size

A core is one time step of a decoder. ``start(features, mask)`` returns the initial recurrent
state (a tuple of (B, ·) tensors) and a per-image cache (a dict of (B, ...) tensors); ``step``
maps the previous word to next-word logits. The single decoding loop (teacher forcing, greedy,
sampling, beam search) lives in ``butd.heads.decoding`` and works with every core.

Implemented variant (heads-reference §11): the Up-Down core attends over the RAW D-d features
and feeds v̂ (D-d) to the language LSTM, as Anderson's Caffe model does (not self-critical's
1000-d embedded regions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, cast

import torch
from torch import nn

from butd.heads.attention import AdditiveAttention, build_attention
from butd.heads.cbam import grid_cbam
from butd.heads.layers import masked_mean, masked_softmax

State = tuple[torch.Tensor, ...]
Cache = dict[str, torch.Tensor]


@dataclass(frozen=True)
class CaptionerConfig:
    """Sizes of a captioner. Defaults are the Up-Down paper's (heads-reference §2)."""

    kind: str = "updown"  # updown | sat | adaptive | sca
    attention: str = "additive"  # additive | uniform (the mean-pool control)
    feature_dim: int = 2048  # D, pool5 of ResNet-101
    lstm_dim: int = 1000  # M, both LSTMs
    att_dim: int = 512  # H, attention hidden units
    embed_dim: int = 1000  # E, word embedding
    init_std: float = 0.01  # Caffe gaussian filler; 0 keeps PyTorch's default init
    sentinel: bool = True  # adaptive only; False is Lu et al.'s "spatial attention" ablation
    # Grid features: G > 0 means the K inputs are G*G row-major cells of a grid (docs/grids.md);
    # 0 means a region set. CBAM and SCA's grid reading need it.
    grid_size: int = 0
    cbam: bool = False  # refine grid features with CBAM before the attention (butd.heads.cbam)
    channel_attention: bool = True  # sca only; False is the spatial-only ablation
    channel_dim: int = 16  # sca only: k, the size each channel's scalar is expanded to


@dataclass(frozen=True)
class StepOutput:
    """One decoder step: logits (B, V), new state, alpha (B, K), beta (B,) or None."""

    logits: torch.Tensor
    state: State
    alpha: torch.Tensor
    beta: torch.Tensor | None


def _lstm(in_dim: int, hidden: int) -> nn.LSTMCell:
    cell = nn.LSTMCell(in_dim, hidden)
    with torch.no_grad():  # forget-gate bias 1 (Caffe); gates are ordered i, f, g, o
        cell.bias_ih[hidden : 2 * hidden].fill_(1.0)
        cell.bias_hh[hidden : 2 * hidden].fill_(0.0)
    return cell


def caffe_init_(module: nn.Module, std: float) -> None:
    """Gaussian(0, std) weights and zero biases, LSTM forget-gate bias kept at 1."""
    if std <= 0:
        return
    for name, p in module.named_parameters():
        if name.endswith("bias_ih") or name.endswith("bias_hh"):
            continue
        if p.dim() >= 2:
            nn.init.normal_(p, 0.0, std)
        elif "bias" in name:
            nn.init.zeros_(p)


class UpDownCore(nn.Module):
    """Top-down attention LSTM + language LSTM (Anderson et al. 2018, Eq. 2–5)."""

    def __init__(self, vocab_size: int, cfg: CaptionerConfig) -> None:
        super().__init__()
        d, m, e = cfg.feature_dim, cfg.lstm_dim, cfg.embed_dim
        self.embed = nn.Embedding(vocab_size, e)
        self.att_lstm = _lstm(m + d + e, m)  # x¹_t = [h²_{t-1}; v̄; W_e Π_t]
        self.attention = build_attention(cfg.attention, d, m, cfg.att_dim)
        self.lang_lstm = _lstm(d + m, m)  # x²_t = [v̂_t; h¹_t]
        self.out = nn.Linear(m, vocab_size)
        self.lstm_dim = m
        self.cbam = grid_cbam(cfg.cbam, cfg.grid_size, d)
        caffe_init_(self, cfg.init_std)

    def start(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[State, Cache]:
        """Zero states (h1, c1, h2, c2) and the cache {features, mask, proj, mean}."""
        if self.cbam is not None:  # grid features refined before the attention reads them
            features = self.cbam(features)
        zeros = features.new_zeros(features.shape[0], self.lstm_dim)
        cache = {
            "features": features,
            "mask": mask,
            "proj": self.attention.project(features),
            "mean": masked_mean(features, mask),
        }
        return (zeros, zeros, zeros, zeros), cache

    def step(self, tokens: torch.Tensor, state: State, cache: Cache) -> StepOutput:
        """tokens (B,) previous words -> logits (B, V)."""
        h1, c1, h2, c2 = state
        x1 = torch.cat([h2, cache["mean"], self.embed(tokens)], dim=1)
        h1, c1 = self.att_lstm(x1, (h1, c1))
        v_hat, alpha = self.attention(h1, cache["features"], cache["proj"], cache["mask"])
        h2, c2 = self.lang_lstm(torch.cat([v_hat, h1], dim=1), (h2, c2))
        return StepOutput(self.out(h2), (h1, c1, h2, c2), alpha, None)


class SATCore(nn.Module):
    """Show, Attend and Tell, soft attention with the scalar β gate and the deep output layer.

    e_ti = w_attᵀ tanh(W_a a_i + W_h h_{t-1} + b); ẑ_t = β_t Σ α_ti a_i, β_t = σ(f_β(h_{t-1}));
    LSTM input [E y_{t-1}; ẑ_t]; p ∝ exp(L_o(E y_{t-1} + L_h h_t + L_z ẑ_t)).
    h_0, c_0 = tanh(f_init(mean a)). The doubly stochastic penalty is in ``butd.heads.objectives``.
    """

    def __init__(self, vocab_size: int, cfg: CaptionerConfig) -> None:
        super().__init__()
        d, m, e = cfg.feature_dim, cfg.lstm_dim, cfg.embed_dim
        self.embed = nn.Embedding(vocab_size, e)
        self.init_h = nn.Linear(d, m)
        self.init_c = nn.Linear(d, m)
        self.attention = build_attention(
            "additive_bias" if cfg.attention == "additive" else cfg.attention, d, m, cfg.att_dim
        )
        self.f_beta = nn.Linear(m, 1)
        self.lstm = _lstm(e + d, m)
        self.out_h = nn.Linear(m, e)
        self.out_z = nn.Linear(d, e)
        self.out = nn.Linear(e, vocab_size)

    def start(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[State, Cache]:
        """h_0, c_0 from the masked mean; cache {features, mask, proj}."""
        mean = masked_mean(features, mask)
        state = (torch.tanh(self.init_h(mean)), torch.tanh(self.init_c(mean)))
        cache = {"features": features, "mask": mask, "proj": self.attention.project(features)}
        return state, cache

    def step(self, tokens: torch.Tensor, state: State, cache: Cache) -> StepOutput:
        """tokens (B,) -> logits (B, V); beta is the selector gate β_t (B,)."""
        h, c = state
        ctx, alpha = self.attention(h, cache["features"], cache["proj"], cache["mask"])
        beta = torch.sigmoid(self.f_beta(h))  # (B, 1)
        z = beta * ctx
        emb = self.embed(tokens)
        h, c = self.lstm(torch.cat([emb, z], dim=1), (h, c))
        logits = self.out(emb + self.out_h(h) + self.out_z(z))
        return StepOutput(logits, (h, c), alpha, beta.squeeze(1))


class AdaptiveCore(nn.Module):
    """Knowing When to Look: spatial attention with a visual sentinel (Lu et al. 2017).

    v_i = ReLU(W_a a_i), v^g = ReLU(W_b ā); x_t = [w_t; v^g]; h_t, m_t = LSTM(x_t);
    s_t = σ(W_x x_t + W_h h_{t-1}) ∘ tanh(m_t);
    α̂ = softmax([z_t; w_hᵀ tanh(W_s s_t + W_g h_t)]), β_t = α̂_{K+1};
    ĉ_t = Σ_i α̂_i v_i + β_t s_t; p = softmax(W_p(ĉ_t + h_t)).

    With ``cfg.sentinel`` False it is the paper's "spatial attention" ablation: ĉ_t = Σ_i α_i v_i
    (softmax over the regions only) and beta None.
    """

    def __init__(self, vocab_size: int, cfg: CaptionerConfig) -> None:
        super().__init__()
        d, m, e = cfg.feature_dim, cfg.lstm_dim, cfg.embed_dim
        self.embed = nn.Embedding(vocab_size, e)
        self.region_proj = nn.Linear(d, m)  # W_a
        self.global_proj = nn.Linear(d, m)  # W_b
        self.lstm = _lstm(e + m, m)
        self.gate_x = nn.Linear(e + m, m)  # W_x
        self.gate_h = nn.Linear(m, m, bias=False)  # W_h
        self.attention = AdditiveAttention(m, m, cfg.att_dim, bias=False)  # W_v, W_g, w_h
        self.sentinel_proj = nn.Linear(m, cfg.att_dim, bias=False)  # W_s
        self.out = nn.Linear(m, vocab_size)
        self.uniform = cfg.attention == "uniform"
        self.use_sentinel = cfg.sentinel
        self.lstm_dim = m

    def start(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[State, Cache]:
        """Zero state; cache {v, mask, proj, global}."""
        v = torch.relu(self.region_proj(features))  # (B, K, M)
        zeros = features.new_zeros(features.shape[0], self.lstm_dim)
        cache = {
            "v": v,
            "mask": mask,
            "proj": self.attention.project(v),
            "global": torch.relu(self.global_proj(masked_mean(features, mask))),
        }
        return (zeros, zeros), cache

    def step(self, tokens: torch.Tensor, state: State, cache: Cache) -> StepOutput:
        """tokens (B,) -> logits (B, V); alpha = spatial weights α (B, K), beta = sentinel β."""
        h_prev, c_prev = state
        x = torch.cat([self.embed(tokens), cache["global"]], dim=1)
        h, c = self.lstm(x, (h_prev, c_prev))
        z = self.attention.logits(h, cache["proj"])  # (B, K)
        if self.uniform:
            z = torch.zeros_like(z)
        if not self.use_sentinel:
            alpha = masked_softmax(z, cache["mask"])
            c_hat = torch.bmm(alpha.unsqueeze(1), cache["v"]).squeeze(1)
            return StepOutput(self.out(c_hat + h), (h, c), alpha, None)
        sentinel = torch.sigmoid(self.gate_x(x) + self.gate_h(h_prev)) * torch.tanh(c)
        g = self.attention.query_proj(h)
        z_s = self.attention.score(torch.tanh(self.sentinel_proj(sentinel) + g))  # (B, 1)
        mask = cache["mask"]
        full_mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        alpha_hat = masked_softmax(torch.cat([z, z_s], dim=1), full_mask)  # (B, K+1)
        beta = alpha_hat[:, -1]
        c_hat = torch.bmm(alpha_hat[:, None, :-1], cache["v"]).squeeze(1)
        c_hat = c_hat + beta.unsqueeze(1) * sentinel
        alpha = alpha_hat[:, :-1] / (1.0 - beta).clamp(min=1e-12).unsqueeze(1)
        return StepOutput(self.out(c_hat + h), (h, c), alpha, beta)


class DecoderCore(Protocol):
    """What the decoder loop needs from a core."""

    def start(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[State, Cache]: ...

    def step(self, tokens: torch.Tensor, state: State, cache: Cache) -> StepOutput: ...


CORES: dict[str, type[nn.Module]] = {"updown": UpDownCore, "sat": SATCore, "adaptive": AdaptiveCore}


def build_core(vocab_size: int, cfg: CaptionerConfig) -> DecoderCore:
    """The decoder core named by ``cfg.kind``."""
    if cfg.kind == "sca":
        from butd.heads.sca import SCACore  # it imports this module

        return cast(DecoderCore, SCACore(vocab_size, cfg))
    if cfg.kind not in CORES:
        raise ValueError(f"captioner kind must be one of {sorted(CORES)}; got {cfg.kind!r}")
    return cast(DecoderCore, CORES[cfg.kind](vocab_size, cfg))
