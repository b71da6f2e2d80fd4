"""Untrained caption / VQA head checkpoints with sharp random weights, for inference tests.

``write_head`` saves ``DIR/last.pt`` in the layout ``butd.heads.train.fit`` writes (``model`` state
dict and ``meta``), so ``butd.heads.inference.load_head(DIR)`` reads it. Weights are redrawn from
N(0, ``std``) with a fixed seed: far from the near-uniform Caffe init, so beam choices and
answer scores are separated by much more than float32 rounding, and CPU and CUDA runs agree
on the words. ``scene_record`` gives one simulated image's regions (``butd.heads.synth``).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from butd.heads.ban import BANConfig
from butd.heads.captioners import CaptionerConfig
from butd.heads.inference import build_head
from butd.heads.synth import SynthWorld, make_scenes
from butd.heads.vocab import Vocabulary
from butd.heads.vqa import VQAConfig
from butd.store.records import FeatureRecord

DIM = 32  # D, region feature size of the simulated records
WORDS = ["a", "red", "blue", "green", "circle", "square", "and", "of", "on", "small", "big"]
ANSWERS = ["red", "blue", "green", "circle", "square", "yes", "no", "0", "1", "2", "3"]


def head_meta(task: str, head: str, dim: int = DIM) -> dict[str, Any]:
    """The ``meta`` of a small ``task`` ("caption" | "vqa") head named ``head``.

    Caption heads: updown, sat, adaptive. VQA heads: updown (paper), updown_relu, ban.
    """
    vocab = Vocabulary(WORDS).words  # with the special tokens first, as training stores it
    if task == "caption":
        config: Any = CaptionerConfig(head, "additive", dim, 24, 16, 16, 0.0)
        return {"task": task, "head": head, "config": asdict(config), "vocab": vocab}
    if head == "ban":
        config = BANConfig(dim, embed_dim=12, hidden_dim=16, glimpses=2, rank=2)
    else:
        variant = "hengyuan" if head == "updown_relu" else "paper"
        config = VQAConfig(variant, feature_dim=dim, embed_dim=12, question_dim=16, hidden_dim=16)
    return {
        "task": task,
        "head": head,
        "config": asdict(config),
        "vocab": vocab,
        "answers": ANSWERS,
        "l2_normalise": True,
    }


def write_head(
    out_dir: Path, task: str, head: str, *, seed: int = 0, std: float = 0.3, dim: int = DIM
) -> Path:
    """Save an untrained ``head`` with N(0, ``std``) weights under ``out_dir``; returns it."""
    meta = head_meta(task, head, dim)
    torch.manual_seed(seed)
    model = build_head(meta)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": meta, "step": 0}, out_dir / "last.pt")
    return out_dir


def scene_record(seed: int = 2, dim: int = DIM) -> FeatureRecord:
    """The regions of one simulated scene (objects, duplicates and clutter: 4-16 regions)."""
    return make_scenes(SynthWorld(dim, seed=0), 1, seed=seed, max_objects=3)[0].record
