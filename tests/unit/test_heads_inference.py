"""butd.heads.inference on an explicit device: the head is moved there and its inputs built there.

Without a GPU, "on the head's device" is checked two ways: an explicit CPU device gives
exactly the default path's and an independent re-computation's outputs, and a stand-in head
whose parameter lives on the ``meta`` device sees every input tensor (features, mask, boxes,
spatial, question / caption tokens) on ``meta``. ``tests/gpu/test_heads_cuda.py`` compares
CUDA with CPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

from butd.heads.decoding import Decoded
from butd.heads.inference import answer, caption, head_device, load_head
from butd.heads.regions import RegionBatch, collate_records
from butd.heads.vocab import EOS, Vocabulary, left_pad, tokenize_question
from butd.workers.heads_task import load_heads
from tests.head_checkpoints import ANSWERS, WORDS, scene_record, write_head

torch.set_num_threads(1)
QUESTION = "what color is the circle?"


@pytest.mark.parametrize("head", ["updown", "sat", "adaptive"])
def test_caption_on_explicit_cpu_equals_default(tmp_path: Path, head: str) -> None:
    path = write_head(tmp_path / head, "caption", head)
    record = scene_record()
    default_model, meta = load_head(path)
    explicit_model, _ = load_head(path, device=torch.device("cpu"))
    assert head_device(explicit_model) == torch.device("cpu")
    ref = caption(default_model, meta, record, beam_size=3, max_len=8)
    got = caption(explicit_model, meta, record, beam_size=3, max_len=8)
    assert got.words == ref.words and got.words  # sharp random weights emit some words
    assert got.log_prob == ref.log_prob
    assert got.attention.device.type == "cpu"
    assert got.attention.shape == (len(got.words), record.num_boxes)
    assert torch.equal(got.attention, ref.attention)


@pytest.mark.parametrize("head", ["updown", "updown_relu", "ban"])
def test_answer_on_explicit_cpu_equals_independent_forward(tmp_path: Path, head: str) -> None:
    path = write_head(tmp_path / head, "vqa", head)
    record = scene_record()
    model, meta = load_head(path, device="cpu")
    got = answer(model, meta, record, QUESTION, top=4)
    default = answer(load_head(path)[0], meta, record, QUESTION, top=4)
    assert got.answers == default.answers and torch.equal(got.attention, default.attention)
    # Independent reference: the forward pass on CPU tensors built here, ranked by numpy.
    regions = collate_records([record], l2_normalise=True)
    ids = Vocabulary(WORDS).encode(tokenize_question(QUESTION))
    out = model(regions, torch.tensor([left_pad(ids, 14)]))
    probs = torch.sigmoid(out.logits[0]).detach().numpy()
    order = probs.argsort(kind="stable")[::-1][:4]
    assert [a for a, _ in got.answers] == [ANSWERS[i] for i in order]
    assert [s for _, s in got.answers] == probs[order].tolist()  # exact: same fp32 numbers
    assert got.attention.device.type == "cpu" and got.attention.shape == (record.num_boxes,)


class _MetaHead(nn.Module):
    """A stand-in head on the ``meta`` device recording the devices of the inputs it gets."""

    def __init__(self, num_answers: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, device="meta"))
        self.num_answers = num_answers
        self.seen: dict[str, torch.device] = {}

    def _record(self, regions: RegionBatch, tokens: torch.Tensor | None = None) -> int:
        for name in ("features", "mask", "boxes", "spatial"):
            self.seen[name] = getattr(regions, name).device
        if tokens is not None:
            self.seen["tokens"] = tokens.device
        return int(regions.features.shape[1])

    def beam_search(self, regions: RegionBatch, *args: Any) -> Decoded:
        self._record(regions)
        a, red = Vocabulary(WORDS).encode(["a", "red"])
        return Decoded(torch.tensor([[[a, red, EOS]]]), torch.tensor([[-1.5]]))

    def forward(self, regions: RegionBatch, tokens: torch.Tensor) -> SimpleNamespace:
        k = self._record(regions, tokens)
        attention = torch.full((1, tokens.shape[1], k), 1.0 / k)
        logits = torch.arange(self.num_answers, dtype=torch.float32)[None]
        return SimpleNamespace(alphas=attention, attention=attention[:, 0], logits=logits)


@pytest.fixture
def no_region_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """RegionBatch's checks read tensor values, which meta tensors do not have."""
    monkeypatch.setattr(RegionBatch, "__post_init__", lambda self: None)


@pytest.mark.usefixtures("no_region_checks")
def test_inputs_are_built_on_the_heads_device() -> None:
    record = scene_record()
    meta = {"vocab": WORDS, "answers": ANSWERS, "config": {"feature_dim": record.feature_dim}}
    head = _MetaHead(len(ANSWERS))
    assert head_device(head) == torch.device("meta")
    got = answer(head, meta, record, QUESTION, top=2)
    assert set(head.seen) == {"features", "mask", "boxes", "spatial", "tokens"}
    assert all(d.type == "meta" for d in head.seen.values()), head.seen
    top2 = torch.sigmoid(torch.tensor([10.0, 9.0])).tolist()  # the stand-in's logits 0..10
    assert got.answers == [(ANSWERS[-1], top2[0]), (ANSWERS[-2], top2[1])]
    head.seen.clear()
    cap = caption(head, meta, record, beam_size=2, max_len=3)  # type: ignore[arg-type]
    assert cap.words == ["a", "red"]
    assert set(head.seen) == {"features", "mask", "boxes", "spatial", "tokens"}
    assert all(d.type == "meta" for d in head.seen.values()), head.seen


def test_worker_load_heads_puts_heads_on_the_device(tmp_path: Path) -> None:
    paths: dict[str, Path | None] = {
        "caption": write_head(tmp_path / "cap", "caption", "updown"),
        "vqa": write_head(tmp_path / "vqa", "vqa", "ban"),
    }
    loaded = load_heads(paths, device="meta")
    assert sorted(loaded) == ["caption", "vqa"]
    for head in loaded.values():
        assert {p.device.type for p in head.model.parameters()} == {"meta"}
    on_cpu = load_heads({"caption": paths["caption"], "vqa": None})
    assert list(on_cpu) == ["caption"]
    assert head_device(on_cpu["caption"].model) == torch.device("cpu")


@pytest.mark.parametrize(("task", "head"), [("caption", "updown"), ("vqa", "ban")])
def test_a_record_of_another_feature_size_is_refused_clearly(
    tmp_path: Path, task: str, head: str
) -> None:
    """A head trained on D-d features, asked about a record of another size, says so (the
    worker passes the message on as the request's error) instead of a matrix-shape error."""
    model, meta = load_head(write_head(tmp_path / head, task, head))
    dim = int(meta["config"]["feature_dim"])
    record = scene_record(dim=dim + 8)
    with pytest.raises(ValueError, match=rf"trained on {dim}-d .* has {dim + 8}-d features"):
        if task == "caption":
            caption(model, meta, record)
        else:
            answer(model, meta, record, QUESTION)
