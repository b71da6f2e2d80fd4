"""Training loop shared by every head: optimiser + schedule recipes, clipping, checkpoints,
resume, progress bar.

Recipes (heads-reference §2–4):
    "updown_caffe":  SGD momentum 0.9, lr 0.01 poly(1) → 0, weight decay 5e-4, clip norm 10
    "selfcritical":  Adam lr 5e-4, ×0.8 every 3 epochs, clip value 0.1
    "scst_caffe":    SGD momentum 0.9, lr 1e-3 × 0.99975^step, clip norm 10
    "hengyuan":      Adamax lr 2e-3, clip norm 0.25
    "ban":           Adamax, warm-up 0.5/1/1.5/2 × 1e-3 over epochs 0–3, × 0.25 at epochs 10, 12,
                     clip norm 0.25
    "adam":          Adam with a constant lr, clip norm 0.25 (the synthetic benchmark)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """One training run. ``steps_per_epoch`` converts the epoch-based schedules to steps."""

    recipe: str = "adam"
    steps: int = 1000  # optimiser updates
    batch_size: int = 100
    lr: float | None = None  # None: the recipe's own
    steps_per_epoch: int = 1000
    checkpoint_every: int = 500  # steps; 0 = only at the end
    seed: int = 0


_BASE_LR = {
    "updown_caffe": 0.01,
    "selfcritical": 5e-4,
    "scst_caffe": 1e-3,
    "hengyuan": 2e-3,
    "ban": 1e-3,
    "adam": 1e-3,
}


def make_optimizer(model: nn.Module, s: TrainSettings) -> torch.optim.Optimizer:
    """The recipe's optimiser over the trainable parameters."""
    if s.recipe not in _BASE_LR:
        raise ValueError(f"recipe must be one of {sorted(_BASE_LR)}; got {s.recipe!r}")
    lr = s.lr if s.lr is not None else _BASE_LR[s.recipe]
    params = [p for p in model.parameters() if p.requires_grad]
    if s.recipe in ("updown_caffe", "scst_caffe"):
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if s.recipe in ("hengyuan", "ban"):
        return torch.optim.Adamax(params, lr=lr)
    return torch.optim.Adam(params, lr=lr)


def lr_factor(s: TrainSettings, step: int) -> float:
    """Multiplier of the base lr at ``step`` (0-based)."""
    epoch = step / max(s.steps_per_epoch, 1)
    if s.recipe == "updown_caffe":
        return max(0.0, 1.0 - step / s.steps)
    if s.recipe == "scst_caffe":
        return 0.99975**step
    if s.recipe == "selfcritical":
        return 0.8 ** int(epoch // 3)
    if s.recipe == "ban":
        if epoch < 4:
            return 0.5 * (int(epoch) + 1)
        return 2.0 * 0.25 ** sum(epoch >= e for e in (10, 12))
    return 1.0


def clip(model: nn.Module, recipe: str) -> None:
    """The recipe's gradient clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if recipe == "selfcritical":
        torch.nn.utils.clip_grad_value_(params, 0.1)
    elif recipe in ("hengyuan", "ban", "adam"):
        torch.nn.utils.clip_grad_norm_(params, 0.25)
    else:
        torch.nn.utils.clip_grad_norm_(params, 10.0)


def save_checkpoint(
    path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, meta: dict[str, Any]
) -> None:
    """Atomic write (tmp name + rename) of model, optimiser, step and metadata."""
    tmp = path.with_suffix(".tmp")
    torch.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "meta": meta},
        tmp,
    )
    tmp.replace(path)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> int:
    """Restore a checkpoint into ``model`` (and ``opt``); returns its step."""
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"])
    if opt is not None:
        opt.load_state_dict(ckpt["optimizer"])
    return int(ckpt["step"])


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    num_examples: int,
    s: TrainSettings,
    out_dir: Path | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    until: int | None = None,
) -> list[float]:
    """Run ``s.steps`` updates of ``loss_fn(example_indices)``; resumes from ``out_dir/last.pt``.

    Args:
        until: stop (and checkpoint) after this many updates instead of ``s.steps``; the lr
            schedule still spans ``s.steps``. A later call resumes from there, so a run can be
            split into phases (the adaptive captioner's sentinel warm-up).

    Returns:
        the loss of every step run in this call.
    """
    opt = make_optimizer(model, s)
    base = [g["lr"] for g in opt.param_groups]
    meta = {**(meta or {}), "settings": asdict(s)}
    start = 0
    last = out_dir / "last.pt" if out_dir is not None else None
    if last is not None and last.exists():
        start = load_checkpoint(last, model, opt)
        logger.info("resumed from %s at step %d", last, start)
    gen = torch.Generator().manual_seed(s.seed + start)
    order = torch.randperm(num_examples, generator=gen)
    pos, losses = 0, []
    model.train()
    end = s.steps if until is None else min(until, s.steps)
    for step in tqdm(
        range(start, end), disable=not progress, desc="train", initial=start, total=s.steps
    ):
        if pos + s.batch_size > num_examples:
            order, pos = torch.randperm(num_examples, generator=gen), 0
        idx = order[pos : pos + s.batch_size]
        pos += s.batch_size
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * lr_factor(s, step)
        loss = loss_fn(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip(model, s.recipe)
        opt.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"loss became {losses[-1]} at step {step}")
        done = step + 1
        if last is not None and (
            done == end or (s.checkpoint_every and done % s.checkpoint_every == 0)
        ):
            save_checkpoint(last, model, opt, done, meta)
    if losses:
        logger.info("trained steps %d..%d, last loss %.4f", start, end, losses[-1])
    return losses
