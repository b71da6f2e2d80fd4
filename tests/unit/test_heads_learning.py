"""Threshold-based proof that the heads learn on simulated region features.

The full table (all heads, controls, conjunction row) is ``bench/heads.py``. Here the
single-batch overfit of every captioner runs in ``make test`` (seconds); the binding, sentinel
and glimpse proofs train for hundreds of steps (tens of seconds each on a quiet CPU, minutes on
a loaded one) and are marked ``slow``: ``make test-all`` runs them.
"""

from __future__ import annotations

from typing import cast

import pytest
import torch

from butd.heads.benchmark import (
    caption_diagnostics,
    caption_model,
    caption_task,
    run_vqa,
    vqa_model,
    vqa_task,
)
from butd.heads.captioners import AdaptiveCore, CaptionerConfig
from butd.heads.decoding import Captioner
from butd.heads.objectives import caption_batch_loss, caption_xe_loss, vqa_loss
from butd.heads.regions import RegionBatch
from butd.heads.synth import COLORS, SHAPES
from butd.heads.train import TrainSettings, fit

torch.set_num_threads(1)


def test_single_batch_overfit_of_every_captioner() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, d, v, t = 8, 6, 16, 20, 6
    mask = torch.ones(b, k, dtype=torch.bool)
    regions = RegionBatch(
        torch.rand(b, k, d, generator=g),
        mask,
        torch.zeros(b, k, 4),
        torch.zeros(b, k, 6),
        tuple(map(str, range(b))),
    )
    targets = torch.randint(4, v, (b, t), generator=g)
    inputs = torch.cat([torch.ones(b, 1, dtype=torch.long), targets[:, :-1]], 1)
    for kind in ("updown", "sat", "adaptive"):
        torch.manual_seed(0)
        model = Captioner(v, CaptionerConfig(kind, "additive", d, 32, 16, 16, init_std=0.0))
        settings = TrainSettings("adam", 60, b, 5e-2)
        losses = fit(
            model,
            lambda _, m=model: caption_xe_loss(m, regions, inputs, targets),
            b,
            settings,
            progress=False,
        )
        assert losses[0] > 2.5 and losses[-1] < 0.1, (kind, losses[0], losses[-1])


@pytest.mark.slow
def test_updown_vqa_binds_colour_to_shape_and_beats_mean_pool() -> None:
    task = vqa_task(128, 400, 80, seed=3)
    attn = run_vqa("updown_relu", task, 700, hidden=64, batch=64)
    pooled = run_vqa("mean_pool", task, 300, hidden=64, batch=64)
    assert attn["color"] >= 90.0, attn
    assert attn["att_hit"] > 90.0, attn
    assert attn["color"] > pooled["color"] + 25.0, (attn, pooled)


@pytest.mark.slow
def test_adaptive_sentinel_gate_is_higher_on_function_words_than_on_colours_and_shapes() -> None:
    """heads-reference §10.1 item 6: β_t, the weight on the visual sentinel, is high where the
    next word is a function word and low where it is a colour or a shape. Trained as the
    benchmark's ``adaptive_warmup``: half the updates without the sentinel, then with it (trained
    jointly from the start, β collapses to ≈ 1 on every word; docs/heads.md)."""
    task = caption_task(32, 200, 20, seed=1)
    torch.manual_seed(0)
    model = caption_model("adaptive", task, 48)
    core = cast(AdaptiveCore, model.core)
    ex, regions = task.train, task.train_regions
    for sentinel in (False, True):
        core.use_sentinel = sentinel
        fit(
            model,
            lambda idx: caption_batch_loss(model, regions, ex, idx),
            len(ex),
            TrainSettings("adam", 125, 50, 3e-3),
            progress=False,
        )
    model.eval()
    idx = torch.arange(300)
    with torch.no_grad():
        betas = model(regions.select(ex.image_rows[idx]), ex.inputs[idx]).betas
    assert betas is not None
    targets = ex.targets[idx]
    function = torch.isin(targets, torch.tensor(task.vocab.ids_of(["a", "and", ","])))
    content = torch.isin(targets, torch.tensor(task.vocab.ids_of([*COLORS, *SHAPES])))
    beta_function, beta_content = float(betas[function].mean()), float(betas[content].mean())
    assert beta_function > 0.2 and beta_content < 0.1, (beta_function, beta_content)


def test_caption_diagnostics_against_a_per_word_loop() -> None:
    """``caption_diagnostics`` (the benchmark's att_named and β columns) equals a plain loop
    over every (caption, step): argmax region's object named by the target word, and β split
    by whether the target is a colour/shape word; decoders without a sentinel report no β."""
    task = caption_task(32, 40, 30, seed=2)
    torch.manual_seed(0)
    model = caption_model("adaptive", task, 16)
    with torch.no_grad():  # sharper attention and a non-trivial β than at initialisation
        core = cast(AdaptiveCore, model.core)
        core.sentinel_proj.weight.normal_(0.0, 2.0)
        core.attention.feature_proj.weight.normal_(0.0, 1.0)
    got = caption_diagnostics(model, task.val_regions, task)

    model.eval()
    with torch.no_grad():
        out = model(task.val_regions.select(task.val.image_rows), task.val.inputs)
    assert out.betas is not None
    hits, named = 0, 0
    beta_by_kind: dict[bool, list[float]] = {True: [], False: []}
    for i, row in enumerate(task.val.image_rows.tolist()):
        record = task.val_scenes[row].record
        for t, target in enumerate(task.val.targets[i].tolist()):
            if target == 0:  # <pad>
                continue
            word = task.vocab.words[target]
            is_content = word in COLORS or word in SHAPES
            beta_by_kind[is_content].append(float(out.betas[i, t]))
            if not is_content:
                continue
            named += 1
            r = int(out.alphas[i, t].argmax())
            if record.extra["object"][r] >= 0:
                seen = (COLORS[record.attrs_id[r]], SHAPES[record.objects_id[r]])
                hits += word in seen
    assert named > 0 and 0 < hits < named
    assert abs(got["att_named"] - 100 * hits / named) < 1e-9
    for key, kind in (("beta_content", True), ("beta_function", False)):
        expected = 100 * sum(beta_by_kind[kind]) / len(beta_by_kind[kind])
        assert abs(got[key] - expected) < 1e-6, key
    assert got["beta_content"] != got["beta_function"]
    plain = caption_diagnostics(caption_model("updown", task, 16), task.val_regions, task)
    assert set(plain) == {"att_named"}


@pytest.mark.slow
def test_ban_glimpse_attention_entropy_falls_during_training() -> None:
    """heads-reference §10.1 item 7: each glimpse's joint K×L attention map sharpens."""
    task = vqa_task(32, 200, 20, seed=2)
    torch.manual_seed(0)
    model = vqa_model("ban2", task, 48)
    ex, regions = task.train, task.train_regions
    idx = torch.arange(400)

    def entropy() -> torch.Tensor:
        """Mean entropy (nats) of each glimpse's map over the probe questions: (G,)."""
        model.eval()
        with torch.no_grad():
            maps = model(regions.select(ex.image_rows[idx]), ex.questions[idx]).attention
        p = maps.flatten(2)  # (B, G, K·L), each row sums to 1
        return -torch.special.xlogy(p, p).sum(-1).mean(0)

    before = entropy()
    fit(
        model,
        lambda i: vqa_loss(model, regions, ex, i),
        len(ex),
        TrainSettings("adam", 300, 64, 1e-3),
        progress=False,
    )
    after = entropy()
    assert before.shape == (2,)
    assert (after < before - 0.3).all(), (before, after)
