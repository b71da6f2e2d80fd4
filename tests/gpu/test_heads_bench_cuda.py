"""``bench/heads.py --device cuda`` (skipped without a GPU): the benchmark's evaluation on the GPU
matches the CPU's for the same untrained heads (weights are initialised on the CPU from the
seed), and a short training run on the GPU completes with every column."""

from __future__ import annotations

import math

import pytest

from butd.heads.benchmark import caption_task, run_caption, run_vqa, vqa_task

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def test_caption_evaluation_on_cuda_matches_cpu() -> None:
    task = caption_task(32, 40, 40, seed=3)
    cpu = run_caption("adaptive", task, 0, hidden=16, device="cpu")
    gpu = run_caption("adaptive", task, 0, hidden=16, device=DEVICE)
    # Argmax-based columns may flip on a near-tie; β is a mean over every word.
    assert abs(gpu["att_named"] - cpu["att_named"]) <= 2.0
    for key in ("beta_content", "beta_function"):
        assert abs(gpu[key] - cpu[key]) < 1e-3, key


def test_vqa_evaluation_on_cuda_matches_cpu() -> None:
    task = vqa_task(32, 40, 40)
    cpu = run_vqa("ban2", task, 0, hidden=16, device="cpu")
    gpu = run_vqa("ban2", task, 0, hidden=16, device=DEVICE)
    assert abs(gpu["overall"] - cpu["overall"]) <= 2.0
    assert abs(gpu["att_hit"] - cpu["att_hit"]) <= 5.0


@pytest.mark.parametrize("head", ["updown", "sat", "adaptive_warmup", "blind"])
def test_short_caption_training_on_cuda(head: str) -> None:
    row = run_caption(head, caption_task(32, 40, 20, seed=3), 20, hidden=16, device=DEVICE)
    for key in ("content_f1", "BLEU-4", "CIDEr-D", "att_named"):
        assert math.isfinite(row[key]), key
