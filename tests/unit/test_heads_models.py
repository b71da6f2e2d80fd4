"""Shapes, masking/order invariance and decoding rules of every head (eval mode)."""

from __future__ import annotations

import pytest
import torch

from butd.heads.ban import BAN, BANConfig
from butd.heads.captioners import CaptionerConfig
from butd.heads.decoding import Captioner
from butd.heads.layers import GatedTanh
from butd.heads.regions import RegionBatch
from butd.heads.vocab import EOS, PAD
from butd.heads.vqa import UpDownVQA, VQAConfig

torch.set_num_threads(1)
D, V = 24, 30


def _regions(seed: int = 0, b: int = 3, k: int = 12) -> RegionBatch:
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([k, k - 2, k - 1])[:b]
    mask = torch.arange(k)[None, :] < counts[:, None]
    feats = torch.relu(torch.randn(b, k, D, generator=g)) * mask[..., None]
    xy = torch.rand(b, k, 2, generator=g) * 0.6
    spatial = torch.cat([xy, xy + 0.3, torch.full((b, k, 2), 0.3)], -1) * mask[..., None]
    return RegionBatch(feats, mask, spatial[..., :4] * 100, spatial, tuple(map(str, range(b))))


def _pad_and_shuffle(r: RegionBatch, extra: int, seed: int) -> RegionBatch:
    """Permute the real regions of every image, then append ``extra`` zero regions."""
    b, k, _ = r.features.shape
    g = torch.Generator().manual_seed(seed)
    feats, spatial, boxes = [], [], []
    for i in range(b):
        n = int(r.mask[i].sum())
        order = torch.cat([torch.randperm(n, generator=g), torch.arange(n, k)])
        feats.append(r.features[i, order])
        spatial.append(r.spatial[i, order])
        boxes.append(r.boxes[i, order])

    def pad(x: list[torch.Tensor]) -> torch.Tensor:
        t = torch.stack(x)
        return torch.cat([t, t.new_zeros(b, extra, t.shape[2])], 1)

    mask = torch.cat([r.mask, torch.zeros(b, extra, dtype=torch.bool)], 1)
    return RegionBatch(pad(feats), mask, pad(boxes), pad(spatial), r.image_ids)


def _captioner(kind: str, attention: str = "additive") -> Captioner:
    torch.manual_seed(0)
    cfg = CaptionerConfig(
        kind.split("_")[0], attention, D, lstm_dim=16, att_dim=8, embed_dim=12, init_std=0.1,
        sentinel=kind != "adaptive_spatial",
    )  # fmt: skip
    return Captioner(V, cfg).eval()


CAPTIONERS = [
    ("updown", "additive"),
    ("updown", "uniform"),
    ("sat", "additive"),
    ("adaptive", "additive"),
    ("adaptive_spatial", "additive"),  # Lu et al.'s ablation without the sentinel
]


@pytest.mark.parametrize(("kind", "attention"), CAPTIONERS)
def test_captioner_invariant_to_padding_and_order(kind: str, attention: str) -> None:
    model, r = _captioner(kind, attention), _regions()
    inputs = torch.randint(4, V, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = model(r, inputs)
        b = model(_pad_and_shuffle(r, 5, seed=2), inputs)
        beam_a = model.beam_search(r, 3, 8)
        beam_b = model.beam_search(_pad_and_shuffle(r, 5, seed=3), 3, 8)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(beam_a.tokens, beam_b.tokens)
    assert a.alphas.shape == (3, 7, 12)
    assert torch.all(a.alphas[1, :, 10:] == 0) and torch.all(b.alphas[:, :, 12:] == 0)
    torch.testing.assert_close(a.alphas.sum(-1), torch.ones(3, 7))


@pytest.mark.parametrize(("kind", "attention"), CAPTIONERS)
def test_beam_one_equals_greedy_and_beam_five_is_not_worse(kind: str, attention: str) -> None:
    model, r = _captioner(kind, attention), _regions(seed=4)
    with torch.no_grad():
        greedy, logps = model.sample(r, 10, greedy=True)
        beam1 = model.beam_search(r, 1, 10)
        beam5 = model.beam_search(r, 5, 10)
    t = greedy.shape[1]
    assert torch.equal(beam1.tokens[:, 0, :t], greedy)
    torch.testing.assert_close(beam1.log_probs[:, 0], logps.sum(1), atol=1e-4, rtol=1e-5)
    assert torch.all(beam5.log_probs[:, 0] >= logps.sum(1) - 1e-4)
    assert torch.all(beam5.log_probs[:, :-1] >= beam5.log_probs[:, 1:])  # best first


def test_repetition_constraint_only_lets_stop_words_repeat() -> None:
    model, r = _captioner("updown"), _regions(seed=5)
    with torch.no_grad():  # an untrained model repeats words freely without the rule
        model.core.out.bias.zero_()
        model.core.out.bias[5] = 9.0  # word 5 dominates every step, then word 6
        model.core.out.bias[6] = 7.0
        free = model.beam_search(r, 3, 12).tokens
        allowed = [6]
        ruled = model.beam_search(r, 3, 12, allowed_multiple=allowed).tokens
    assert (free[:, 0] == 5).sum(-1).min() > 1
    assert (ruled[:, 0] == 6).sum(-1).min() > 1
    for seq in ruled.flatten(0, 1).tolist():
        words = [w for w in seq if w not in (PAD, EOS)]
        repeated = {w for w in words if words.count(w) > 1}
        assert repeated <= set(allowed), seq


def test_adaptive_sentinel_beta_in_unit_interval() -> None:
    model, r = _captioner("adaptive"), _regions()
    inputs = torch.randint(4, V, (3, 5))
    out = model(r, inputs)
    assert out.betas is not None and out.betas.shape == (3, 5)
    assert torch.all((out.betas > 0) & (out.betas < 1))
    spatial = _captioner("adaptive_spatial")
    spatial.load_state_dict(model.state_dict())  # same weights, sentinel switched off
    no_sentinel = spatial(r, inputs)
    assert no_sentinel.betas is None
    assert not torch.allclose(no_sentinel.logits, out.logits)


VQA_HEADS = [
    lambda: UpDownVQA(V, 9, VQAConfig("paper", "top_down", D, 10, 16, 16)),
    lambda: UpDownVQA(V, 9, VQAConfig("hengyuan", "top_down", D, 10, 16, 16)),
    lambda: UpDownVQA(V, 9, VQAConfig("paper", "mean", D, 10, 16, 16)),
    lambda: BAN(V, 9, BANConfig(D, 10, 16, glimpses=2, counter=False)),
    lambda: BAN(V, 9, BANConfig(D, 10, 16, glimpses=3, counter=True, count_objects=4)),
]


@pytest.mark.parametrize(
    "make", VQA_HEADS, ids=["paper", "relu_wn", "mean", "ban2", "ban3_counter"]
)
def test_vqa_heads_invariant_to_padding_and_order(make: object) -> None:
    torch.manual_seed(0)
    model = make().eval()  # type: ignore[operator]
    r = _regions(seed=6)
    q = torch.tensor([[0, 0, 5, 6, 7], [0, 4, 5, 6, 8], [9, 4, 5, 6, 7]])
    with torch.no_grad():
        a = model(r, q)
        b = model(_pad_and_shuffle(r, 4, seed=7), q)
    assert a.logits.shape == (3, 9)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-4)
    att = a.attention if a.attention.dim() == 2 else a.attention.sum(dim=(1, 3))
    assert torch.all(att[1, 10:] == 0)


def test_ban_joint_softmax_and_masks() -> None:
    torch.manual_seed(0)
    model = BAN(V, 9, BANConfig(D, 10, 16, glimpses=2, counter=False)).eval()
    r = _regions()
    q = torch.tensor([[0, 0, 5, 6, 7]] * 3)
    maps = model(r, q).attention  # (B, G, K, L)
    torch.testing.assert_close(maps.sum(dim=(2, 3)), torch.ones(3, 2))
    assert torch.all(maps[..., :2] == 0)  # question padding
    assert torch.all(maps[1, :, 10:] == 0)  # region padding


def test_gated_tanh_formula() -> None:
    layer = GatedTanh(4, 3)
    x = torch.randn(5, 4)
    expected = torch.tanh(layer.fc(x)) * torch.sigmoid(layer.gate(x))
    torch.testing.assert_close(layer(x), expected)
