"""Training checkpoints: a canonical weight file plus the state needed to resume.

``OUT/checkpoints/iter_0000500.safetensors``  canonical weights (``save_canonical``): loads
                                              with ``butd.detector.weights.load`` and runs in the
                                              Extractor as is.
``OUT/checkpoints/iter_0000500.state.pt``     iteration, optimiser state (momentum buffers),
                                              the box predictor in its training
                                              parameterisation (bit-exact resume) and the
                                              config, written after the weights.

Both are written under a temporary name and renamed, state last, so the newest ``.state.pt``
always has its weights next to it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from butd.detector.config import ModelSpec
from butd.detector.train.init import BBOX_PRED_KEYS, to_canonical
from butd.detector.weights.canonical import save_canonical

logger = logging.getLogger(__name__)

_STATE = re.compile(r"iter_(\d+)\.state\.pt$")


@dataclass(frozen=True)
class ResumePoint:
    """What a resumed run restores."""

    iteration: int
    weights: Path
    optimizer: dict[str, Any]
    bbox_pred: dict[str, torch.Tensor]
    config: dict[str, Any]


def checkpoint_paths(out: Path, iteration: int) -> tuple[Path, Path]:
    """(weights, state) paths of a checkpoint taken after ``iteration`` iterations."""
    stem = out / "checkpoints" / f"iter_{iteration:07d}"
    return stem.with_suffix(".safetensors"), stem.with_name(stem.name + ".state.pt")


def save_checkpoint(
    out: Path,
    iteration: int,
    model: torch.nn.Module,
    spec: ModelSpec,
    optimizer: torch.optim.Optimizer,
    config: dict[str, Any],
    scale: tuple[float, float, float, float],
) -> Path:
    """Writes the canonical weights and the resume state after ``iteration`` iterations."""
    weights, state_path = checkpoint_paths(out, iteration)
    state = model.state_dict()
    save_canonical(
        weights, to_canonical(state, scale), spec, source_sha256=None, source_format="trained"
    )
    payload = {
        "iteration": iteration,
        "optimizer": optimizer.state_dict(),
        "bbox_pred": {k: state[k].detach().cpu().clone() for k in BBOX_PRED_KEYS},
        "config": config,
    }
    tmp = state_path.with_name(state_path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, state_path)
    logger.info("checkpoint at iteration %d: %s", iteration, weights)
    return weights


def latest_checkpoint(out: Path) -> ResumePoint | None:
    """The newest complete checkpoint under ``out/checkpoints``, or None."""
    found = []
    for p in (out / "checkpoints").glob("iter_*.state.pt"):
        m = _STATE.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    if not found:
        return None
    iteration, state_path = max(found)
    weights, _ = checkpoint_paths(out, iteration)
    payload = torch.load(state_path, map_location="cpu", weights_only=True)
    return ResumePoint(
        iteration=int(payload["iteration"]),
        weights=weights,
        optimizer=payload["optimizer"],
        bbox_pred=payload["bbox_pred"],
        config=payload["config"],
    )
