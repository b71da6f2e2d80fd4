"""CBAM and the SCA-CNN core against straightforward independent computations.

CBAM reference: explicit loops over channels and positions in float64 NumPy (mean/max pools, the
two-layer MLP written as matrix products, the 7x7 convolution as a sum over the zero-padded
window). SCA reference: the paper's equations for one step in float64 NumPy. Tolerance: float32
against float64, rtol 1e-4 / atol 1e-6.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from butd.heads.captioners import CaptionerConfig
from butd.heads.cbam import CBAM, GridCBAM, grid_cbam
from butd.heads.decoding import Captioner
from butd.heads.regions import RegionBatch
from butd.heads.vqa import UpDownVQA, VQAConfig

torch.set_num_threads(1)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def reference_cbam(block: CBAM, x: np.ndarray) -> np.ndarray:
    """F'' of one map x (C, H, W) from the module's weights, by loops."""
    w1, b1 = (p.detach().double().numpy() for p in (block.mlp[0].weight, block.mlp[0].bias))
    w2, b2 = (p.detach().double().numpy() for p in (block.mlp[2].weight, block.mlp[2].bias))
    conv = block.spatial.weight.detach().double().numpy()[0]  # (2, 7, 7)
    bias = float(block.spatial.bias.detach())
    c, h, w = x.shape

    def mlp(v: np.ndarray) -> np.ndarray:
        return w2 @ np.maximum(w1 @ v + b1, 0.0) + b2

    avg = np.array([x[i].sum() / (h * w) for i in range(c)])
    mx = np.array([x[i].max() for i in range(c)])
    f1 = sigmoid(mlp(avg) + mlp(mx))[:, None, None] * x
    maps = np.stack([f1.mean(axis=0), f1.max(axis=0)])  # [AvgPool_c; MaxPool_c]
    r = conv.shape[1] // 2
    padded = np.zeros((2, h + 2 * r, w + 2 * r))
    padded[:, r : r + h, r : r + w] = maps
    s = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            s[i, j] = (padded[:, i : i + 2 * r + 1, j : j + 2 * r + 1] * conv).sum() + bias
    return sigmoid(s)[None] * f1


def test_cbam_equals_the_loop_reference_with_paper_defaults() -> None:
    torch.manual_seed(0)
    block = CBAM(64)
    assert block.mlp[0].out_features == 64 // 16 and block.spatial.kernel_size == (7, 7)
    x = torch.rand(2, 64, 5, 6) * 2 - 0.5
    got = block(x).detach().numpy()
    for b in range(2):
        want = reference_cbam(block, x[b].double().numpy())
        np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-6)


def test_grid_cbam_reads_row_major_cells_and_refuses_regions() -> None:
    torch.manual_seed(1)
    grid = GridCBAM(32)
    cells = torch.rand(1, 9, 32)
    got = grid(cells)
    as_map = cells.reshape(1, 3, 3, 32).permute(0, 3, 1, 2)
    want = grid.block(as_map).permute(0, 2, 3, 1).reshape(1, 9, 32)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="square"):
        grid(torch.rand(1, 8, 32))
    with pytest.raises(ValueError, match="grid"):
        grid_cbam(True, 0, 32)


def reference_sca_step(core, feats: np.ndarray, h: np.ndarray, c_state: np.ndarray, token: int):
    """One SCA step for one image in float64 from the core's weights: (alpha, h_t)."""

    def np_(t: torch.Tensor) -> np.ndarray:
        return t.detach().double().numpy()

    d = feats.shape[1]
    v = feats.mean(axis=0)  # (D,)
    b = np.tanh(v[:, None] * np_(core.chan_w) + np_(core.chan_b) + np_(core.chan_h.weight) @ h)
    e = b @ np_(core.chan_score.weight)[0] + np_(core.chan_score.bias)[0]
    beta = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
    scaled = feats * (beta * d)
    a = np.tanh(scaled @ np_(core.spat_v.weight).T + np_(core.spat_v.bias)
                + np_(core.spat_h.weight) @ h)  # fmt: skip
    z = a @ np_(core.spat_score.weight)[0] + np_(core.spat_score.bias)[0]
    alpha = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    x = alpha @ scaled
    inp = np.concatenate([np_(core.embed.weight)[token], x])
    gates = np_(core.lstm.weight_ih) @ inp + np_(core.lstm.bias_ih)
    gates = gates + np_(core.lstm.weight_hh) @ h + np_(core.lstm.bias_hh)
    i, f, g, o = np.split(gates, 4)
    c_new = sigmoid(f) * c_state + sigmoid(i) * np.tanh(g)
    return alpha, sigmoid(o) * np.tanh(c_new)


def test_sca_step_equals_the_paper_equations() -> None:
    torch.manual_seed(2)
    cfg = CaptionerConfig("sca", "additive", 24, 16, 8, 12, init_std=0.0, grid_size=3)
    model = Captioner(10, cfg).eval()
    core = model.core
    feats = torch.rand(1, 9, 24)
    mask = torch.ones(1, 9, dtype=torch.bool)
    _state, cache = core.start(feats, mask)
    h0 = torch.rand(1, 16) - 0.5
    c0 = torch.rand(1, 16) - 0.5
    out = core.step(torch.tensor([4]), (h0, c0), cache)
    alpha, h1 = reference_sca_step(core, feats[0].double().numpy(), h0[0].double().numpy(),
                                   c0[0].double().numpy(), 4)  # fmt: skip
    np.testing.assert_allclose(out.alpha[0].detach().numpy(), alpha, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.state[0][0].detach().numpy(), h1, rtol=1e-4, atol=1e-6)


def test_sca_without_channel_attention_weighs_channels_evenly_and_masks_regions() -> None:
    torch.manual_seed(3)
    cfg = CaptionerConfig("sca", "additive", 16, 8, 8, 8, init_std=0.0, channel_attention=False)
    core = Captioner(7, cfg).eval().core
    feats = torch.rand(2, 5, 16)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    state, cache = core.start(feats, mask)
    beta = core.channel_weights(state[0], cache["mean"])
    torch.testing.assert_close(beta, torch.full((2, 16), 1 / 16))
    out = core.step(torch.tensor([1, 2]), state, cache)
    assert torch.all(out.alpha[1, 3:] == 0) and torch.allclose(out.alpha.sum(1), torch.ones(2))


def test_cbam_heads_train_step_over_grids() -> None:
    torch.manual_seed(4)
    feats = torch.rand(3, 9, 32)
    batch = RegionBatch(
        feats, torch.ones(3, 9, dtype=torch.bool), torch.zeros(3, 9, 4), torch.zeros(3, 9, 6),
        ("a", "b", "c"),
    )  # fmt: skip
    vqa = UpDownVQA(12, 5, VQAConfig(feature_dim=32, question_dim=8, hidden_dim=8, grid_size=3,
                                     cbam=True))  # fmt: skip
    out = vqa(batch, torch.randint(1, 12, (3, 4)))
    out.logits.sum().backward()
    assert vqa.cbam is not None and vqa.cbam.block.spatial.weight.grad is not None
    cap = Captioner(9, CaptionerConfig("updown", "additive", 32, 8, 8, 8, grid_size=3, cbam=True))
    tf = cap(batch, torch.randint(0, 9, (3, 5)))
    assert tf.logits.shape[:2] == (3, 5)
