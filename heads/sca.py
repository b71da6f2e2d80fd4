"""SCA-CNN captioner core (Chen et al., CVPR 2017): channel-wise, then spatial attention.

Shape glossary:
    B   batch (images × beams)
    K   positions: the G*G cells of a grid, or the regions of a region set; mask (B, K)
    D   channels (feature size)
    k   channel_dim: each channel's scalar is expanded to k (W_c ∈ R^k, an outer product)
    H   att_dim, the spatial attention's hidden size
    M   LSTM size;  E word embedding;  V vocabulary

One step, driven by the previous hidden state h_{t-1} (heads-reference §7, the paper's C-S order):

    channel:  v = mean_i V_i ∈ R^D (one scalar per channel, masked mean)
              b = tanh(v ⊗ W_c + b_c ⊕ W_hc h_{t-1}) ∈ R^{D×k};  β = softmax_D(b W_i' + b_i')
    spatial:  V' = V ⊙ (D β)  (β rescaled so its mean weight is 1, as the official code does)
              a = tanh(W_s V' ⊕ W_hs h_{t-1});  α = masked softmax_K(a w_i + b_i)
    X = Σ_i α_i V'_i ∈ R^D;   h_t = LSTM([E y_{t-1}; X], h_{t-1});   p = softmax(W_p h_t)

``channel_attention=False`` is the spatial-only ablation (β = 1/D, so V' = V). Over a region set
"spatial" means the regions. Multi-layer SCA (attention at several conv levels, the attended map
re-entering the CNN) needs the backbone in the loop; the service's grid has one level (res5), so
only the single-layer form applies. ``alpha`` reported per step is the spatial α (B, K); the
step's ``beta`` is None (the channel weights β (B, D) come from ``channel_weights``).
"""

from __future__ import annotations

import torch
from torch import nn

from butd.heads.captioners import Cache, CaptionerConfig, State, StepOutput, _lstm
from butd.heads.cbam import grid_cbam
from butd.heads.layers import masked_mean, masked_softmax


class SCACore(nn.Module):
    """Single-layer SCA-CNN decoder step over grid cells or regions."""

    def __init__(self, vocab_size: int, cfg: CaptionerConfig) -> None:
        super().__init__()
        d, m, e, h, k = cfg.feature_dim, cfg.lstm_dim, cfg.embed_dim, cfg.att_dim, cfg.channel_dim
        self.embed = nn.Embedding(vocab_size, e)
        self.lstm = _lstm(e + d, m)
        self.out = nn.Linear(m, vocab_size)
        self.chan_w = nn.Parameter(torch.randn(k) * 0.1)  # W_c: channel scalar -> k
        self.chan_b = nn.Parameter(torch.zeros(k))  # b_c
        self.chan_h = nn.Linear(m, k, bias=False)  # W_hc
        self.chan_score = nn.Linear(k, 1)  # W_i', b_i'
        self.spat_v = nn.Linear(d, h)  # W_s, b_s
        self.spat_h = nn.Linear(m, h, bias=False)  # W_hs
        self.spat_score = nn.Linear(h, 1)  # W_i, b_i
        self.channel_attention = cfg.channel_attention
        self.cbam = grid_cbam(cfg.cbam, cfg.grid_size, d)
        self.lstm_dim = m

    def start(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[State, Cache]:
        """Zero state (h, c); cache {features, mask, mean}."""
        if self.cbam is not None:
            features = self.cbam(features)
        zeros = features.new_zeros(features.shape[0], self.lstm_dim)
        cache = {"features": features, "mask": mask, "mean": masked_mean(features, mask)}
        return (zeros, zeros), cache

    def channel_weights(self, h: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """β (B, D), summing to 1 over the channels (uniform without channel attention)."""
        if not self.channel_attention:
            return mean.new_full(mean.shape, 1.0 / mean.shape[1])
        b = torch.tanh(
            mean.unsqueeze(2) * self.chan_w + self.chan_b + self.chan_h(h).unsqueeze(1)
        )  # (B, D, k)
        return torch.softmax(self.chan_score(b).squeeze(2), dim=1)

    def step(self, tokens: torch.Tensor, state: State, cache: Cache) -> StepOutput:
        """tokens (B,) previous words -> logits (B, V); alpha = spatial weights (B, K)."""
        h, c = state
        feats, mask = cache["features"], cache["mask"]
        beta = self.channel_weights(h, cache["mean"])  # (B, D)
        scaled = feats * (beta * feats.shape[2]).unsqueeze(1)  # V' (B, K, D)
        hidden = torch.tanh(self.spat_v(scaled) + self.spat_h(h).unsqueeze(1))  # (B, K, H)
        alpha = masked_softmax(self.spat_score(hidden).squeeze(2), mask)  # (B, K)
        x = torch.bmm(alpha.unsqueeze(1), scaled).squeeze(1)  # (B, D)
        h, c = self.lstm(torch.cat([self.embed(tokens), x], dim=1), (h, c))
        return StepOutput(self.out(h), (h, c), alpha, None)
