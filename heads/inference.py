"""Trained heads as objects: build from a checkpoint, caption regions, answer questions.

A checkpoint (``DIR/last.pt``, written by ``butd.heads.train.fit``) carries in ``meta``: ``task``
("caption" | "vqa"), ``head``, ``config`` (the dataclass as a dict), ``vocab`` (word list),
``answers`` (VQA) and ``l2_normalise``.

Devices: ``load_head(path, device=...)`` puts the head on a device; ``caption`` and ``answer``
build every input tensor (regions, tokens) on the device of the head's parameters and return
CPU tensors and Python numbers, wherever the head runs.

Shape glossary:
    K   regions,  T   words,  L   question tokens
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from butd.heads.ban import BAN, BANConfig
from butd.heads.captioners import CaptionerConfig
from butd.heads.decoding import Captioner, strip_tokens
from butd.heads.regions import collate_records, grid_as_regions
from butd.heads.vocab import ALLOWED_MULTIPLE, BOS, Vocabulary, left_pad, tokenize_question
from butd.heads.vqa import UpDownVQA, VQAConfig
from butd.store.records import FeatureRecord


def build_head(meta: dict[str, Any]) -> nn.Module:
    """The untrained module a checkpoint's ``meta`` describes."""
    v = len(meta["vocab"])
    if meta["task"] == "caption":
        return Captioner(v, CaptionerConfig(**meta["config"]))
    n = len(meta["answers"])
    if meta["head"] == "ban":
        return BAN(v, n, BANConfig(**meta["config"]))
    return UpDownVQA(v, n, VQAConfig(**meta["config"]))


def load_head(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Model (eval mode, on ``device``) and meta from ``DIR`` or ``DIR/last.pt``.

    Args:
        path: a checkpoint directory (``butd heads train --out DIR``) or its ``last.pt``.
        device: torch device the head is moved to ("cpu", "cuda", "cuda:1").
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model = build_head(ckpt["meta"])
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt["meta"]


def head_input(meta: dict[str, Any], record: FeatureRecord) -> FeatureRecord:
    """What the head reads of ``record``: its regions, or its grid cells for a head trained on
    grid features (``config["grid_size"]`` > 0; ValueError when the record has no such grid)."""
    g = int(meta["config"].get("grid_size", 0))
    return grid_as_regions(record, g) if g else record


def check_features(meta: dict[str, Any], record: FeatureRecord) -> None:
    """Raise ValueError when the record's feature size is not the one the head was trained on
    (a head trained on another detector's features), instead of a matrix-shape error."""
    expected = int(meta["config"]["feature_dim"])
    if record.feature_dim != expected:
        raise ValueError(
            f"this {meta.get('task', '')} head was trained on {expected}-d region features; "
            f"image {record.image_id!r} has {record.feature_dim}-d features "
            f"(model {record.model_version}): train the head on features of this model"
        )


def head_device(model: nn.Module) -> torch.device:
    """The device of the head's parameters (CPU for a head without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@dataclass(frozen=True)
class CaptionResult:
    """caption words, log-prob of the caption, attention (T, K) f32 on the CPU per word."""

    words: list[str]
    log_prob: float
    attention: torch.Tensor


@torch.no_grad()
def caption(
    model: Captioner,
    meta: dict[str, Any],
    record: FeatureRecord,
    beam_size: int = 5,
    max_len: int = 20,
) -> CaptionResult:
    """Beam search with Anderson's stop-word rule; attention from re-running the caption.

    Runs on the head's device (``head_device``); the result is on the CPU.
    """
    record = head_input(meta, record)
    check_features(meta, record)
    device = head_device(model)
    vocab = Vocabulary(meta["vocab"])
    regions = collate_records([record], l2_normalise=bool(meta.get("l2_normalise", False)))
    regions = regions.to(device)
    decoded = model.beam_search(regions, beam_size, max_len, vocab.ids_of(ALLOWED_MULTIPLE))
    ids = strip_tokens(decoded.tokens[:, 0])[0]
    inputs = torch.tensor([[BOS, *ids]], device=device)
    alphas = model(regions, inputs).alphas[0, : len(ids)]  # (T, K)
    return CaptionResult(vocab.decode(ids), float(decoded.log_probs[0, 0]), alphas.cpu())


@dataclass(frozen=True)
class Answer:
    """Top answers with sigmoid scores, and the attention over regions (K,) on the CPU."""

    answers: list[tuple[str, float]]
    attention: torch.Tensor


@torch.no_grad()
def answer(
    model: nn.Module, meta: dict[str, Any], record: FeatureRecord, question: str, top: int = 5
) -> Answer:
    """Answer one question about one image, on the head's device (``head_device``)."""
    record = head_input(meta, record)
    check_features(meta, record)
    device = head_device(model)
    vocab = Vocabulary(meta["vocab"])
    regions = collate_records([record], l2_normalise=bool(meta.get("l2_normalise", True)))
    regions = regions.to(device)
    tokens = left_pad(vocab.encode(tokenize_question(question)), int(meta.get("max_question", 14)))
    q = torch.tensor([tokens], device=device)  # (1, L)
    out = model(regions, q)
    probs = torch.sigmoid(out.logits[0])
    best = probs.topk(min(top, probs.numel()))
    att = out.attention[0] if out.attention.dim() == 2 else out.attention[0].sum(dim=(0, 2))
    names: Sequence[str] = meta["answers"]
    scores, indices = best.values.tolist(), best.indices.tolist()  # one copy to the host
    return Answer([(names[i], p) for p, i in zip(scores, indices, strict=True)], att.cpu())
