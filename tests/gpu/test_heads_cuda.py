"""Heads on CUDA (skipped without a GPU): the same caption and answers as on the CPU.

Each head is an untrained checkpoint with sharp N(0, 0.3) weights (``tests.head_checkpoints``):
on the scene used, its best beam beats the runner-up by more than 0.02 nats (measured on CPU,
and float64 gives the same words), far above fp32 CUDA-vs-CPU rounding, so the words must be
identical. Tolerances: caption log-prob 1e-4 absolute (a sum of up to 20 log-probs), attention
weights and answer scores 1e-5 absolute. TF32 is off, as the extractor sets it on CUDA.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from butd.heads.inference import answer, caption, head_device, load_head
from tests.head_checkpoints import ANSWERS, scene_record, write_head

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def strict_fp32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("head", ["updown", "sat", "adaptive"])
def test_caption_on_cuda_equals_cpu(tmp_path: Path, head: str) -> None:
    path = write_head(tmp_path / head, "caption", head)
    record = scene_record()
    cpu_model, meta = load_head(path)
    gpu_model, _ = load_head(path, device="cuda")
    assert head_device(gpu_model).type == "cuda"
    ref = caption(cpu_model, meta, record)
    got = caption(gpu_model, meta, record)
    assert got.words == ref.words and got.words
    assert got.log_prob == pytest.approx(ref.log_prob, abs=1e-4)
    assert got.attention.device.type == "cpu"
    torch.testing.assert_close(got.attention, ref.attention, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["updown", "updown_relu", "ban"])
def test_answer_on_cuda_equals_cpu(tmp_path: Path, head: str) -> None:
    path = write_head(tmp_path / head, "vqa", head)
    record = scene_record()
    cpu_model, meta = load_head(path)
    gpu_model, _ = load_head(path, device="cuda")
    question = "what color is the circle?"
    ref = answer(cpu_model, meta, record, question, top=len(ANSWERS))
    got = answer(gpu_model, meta, record, question, top=len(ANSWERS))
    # Every answer's score: compared by name, since near-equal scores may swap ranks.
    ref_scores, got_scores = dict(ref.answers), dict(got.answers)
    assert got_scores.keys() == ref_scores.keys() == set(ANSWERS)
    for name, score in ref_scores.items():
        assert got_scores[name] == pytest.approx(score, abs=1e-5), name
    assert got.attention.device.type == "cpu"
    torch.testing.assert_close(got.attention, ref.attention, atol=1e-5, rtol=0)
