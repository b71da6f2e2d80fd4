"""Counter, schedules, SCST and the doubly stochastic penalty."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from butd.heads.captioners import CaptionerConfig
from butd.heads.counter import Counter
from butd.heads.decoding import Captioner
from butd.heads.metrics.captions import CiderD
from butd.heads.objectives import caption_xe_loss, doubly_stochastic_penalty, scst_loss
from butd.heads.regions import RegionBatch
from butd.heads.train import TrainSettings, fit, lr_factor
from butd.heads.vocab import PAD, Vocabulary

torch.set_num_threads(1)


def _boxes(corners: list[list[float]]) -> torch.Tensor:
    return torch.tensor(corners).t().unsqueeze(0)  # (1, 4, K)


def test_untrained_counter_counts_attended_objects_and_merges_duplicates() -> None:
    counter = Counter(objects=4)  # untrained: every f is the identity on [0, 1]
    distinct = [
        [0.0, 0.0, 0.2, 0.2],
        [0.4, 0.4, 0.6, 0.6],
        [0.7, 0.0, 0.9, 0.2],
        [0.0, 0.7, 0.2, 0.9],
    ]
    big, small = 20.0, -20.0
    three = counter(_boxes(distinct), torch.tensor([[big, big, big, small]]))
    assert int(three.argmax()) == 3
    duplicate = [*distinct[:3], distinct[0]]  # the 4th region is a duplicate of the 1st
    dup = counter(_boxes(duplicate), torch.tensor([[big, big, big, big]]))
    assert int(dup.argmax()) == 3


def test_schedules() -> None:
    ban = TrainSettings("ban", steps=1400, steps_per_epoch=100)
    assert [lr_factor(ban, e * 100) for e in (0, 1, 2, 3, 4, 9, 10, 12)] == [
        0.5, 1.0, 1.5, 2.0, 2.0, 2.0, 0.5, 0.125,
    ]  # fmt: skip
    poly = TrainSettings("updown_caffe", steps=1000)
    assert lr_factor(poly, 0) == 1.0 and lr_factor(poly, 500) == pytest.approx(0.5)
    assert lr_factor(TrainSettings("scst_caffe"), 1000) == pytest.approx(0.99975**1000)
    assert lr_factor(TrainSettings("selfcritical", steps_per_epoch=10), 35) == pytest.approx(0.8)


def test_fit_until_stops_and_the_next_call_resumes_on_the_same_schedule(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 1), torch.randn(20, 3), torch.randn(20, 1)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        return ((model(x[idx]) - y[idx]) ** 2).mean()

    s = TrainSettings("updown_caffe", steps=10, batch_size=5, checkpoint_every=0)
    first = fit(model, loss, 20, s, tmp_path, progress=False, until=4)
    ckpt = torch.load(tmp_path / "last.pt", weights_only=False)
    assert len(first) == 4 and ckpt["step"] == 4
    # The poly schedule spans all 10 steps: the last update ran at 0.01 × (1 − 3/10).
    assert ckpt["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.007)
    assert fit(model, loss, 20, s, tmp_path, progress=False, until=3) == []  # already past
    rest = fit(model, loss, 20, s, tmp_path, progress=False)
    assert len(rest) == 6 and torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 10


def test_doubly_stochastic_penalty_ignores_padding_and_padded_steps() -> None:
    alphas = torch.tensor([[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])  # (1, T=3, K=3)
    mask = torch.tensor([[True, True, False]])
    steps = torch.tensor([[True, True, False]])
    # coverage over real steps = (1.5, 0.5, 0) -> (1-1.5)² + (1-0.5)² on the 2 real regions
    assert float(doubly_stochastic_penalty(alphas, mask, steps)) == pytest.approx(0.5)


def test_xe_loss_weighs_the_penalty_against_the_summed_nll_as_in_the_paper() -> None:
    """Xu et al.: −Σ_t log p + λ·penalty. With a token-mean XE the penalty is divided by the
    mean caption length (6 real tokens here), not added at ~T× the paper's strength."""
    torch.manual_seed(0)
    b, k, d, v = 2, 3, 8, 12
    regions = RegionBatch(
        torch.rand(b, k, d), torch.ones(b, k, dtype=torch.bool), torch.zeros(b, k, 4),
        torch.zeros(b, k, 6), ("0", "1"),
    )  # fmt: skip
    targets = torch.tensor([[4, 5, 6, 7, 2, PAD, PAD], [4, 5, 6, 7, 8, 9, 2]])  # 5 and 7 tokens
    inputs = torch.cat([torch.ones(b, 1, dtype=torch.long), targets[:, :-1]], 1)
    model = Captioner(v, CaptionerConfig("sat", "additive", d, 16, 8, 8, init_std=0.0)).eval()
    with torch.no_grad():
        alphas = model(regions, inputs).alphas
        penalty = doubly_stochastic_penalty(alphas, regions.mask, targets != PAD)
        xe = caption_xe_loss(model, regions, inputs, targets)
        total = caption_xe_loss(model, regions, inputs, targets, ds_lambda=2.0)
    assert float(penalty) > 0.5  # 6 steps over 3 regions: coverage ≈ 2, far from 1
    assert float(total - xe) == pytest.approx(2.0 * float(penalty) / 6.0, rel=1e-5)


def test_scst_loss_weights_beam_captions_by_centred_cider() -> None:
    torch.manual_seed(0)
    vocab = Vocabulary(["a", "red", "circle", "blue", "star"])
    model = Captioner(len(vocab), CaptionerConfig("updown", "additive", 8, 16, 8, 8, init_std=0.1))
    mask = torch.ones(2, 5, dtype=torch.bool)
    regions = RegionBatch(
        torch.rand(2, 5, 8), mask, torch.zeros(2, 5, 4), torch.zeros(2, 5, 6), ("x", "y")
    )
    refs = [["a red circle"], ["a blue star"]]
    loss, reward = scst_loss(model, regions, refs, CiderD(refs), vocab, beam_size=3, max_len=5)
    loss.backward()
    assert torch.isfinite(loss) and reward >= 0.0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
