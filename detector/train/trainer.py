"""The training loop: SGD with momentum, linear warm-up, step decay, checkpoints, resume.

The learning rate is a pure function of the iteration, the data order and target sampling are
pure functions of ``(seed, iteration)`` and the optimiser's momentum is checkpointed, so a run
resumed from a checkpoint continues exactly where the uninterrupted run would be.

Shape glossary:
    B   images of the calibration batch
    R   RoIs of the calibration batch
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from butd.detector.config import ExtractionConfig
from butd.detector.model import Detector
from butd.detector.train.checkpoint import latest_checkpoint, save_checkpoint
from butd.detector.train.configs import TrainConfig
from butd.detector.train.dataset import TrainSample, draws_for_iteration, load_sample
from butd.detector.train.init import (
    BBOX_PRED_KEYS,
    build_spec,
    calibrate_frozen_bn,
    export_scale,
    freeze_stages,
    from_canonical,
    init_weights,
)
from butd.detector.train.step import LOSS_NAMES, training_losses
from butd.detector.train.vg import VGImage
from butd.detector.weights.canonical import load as load_canonical

logger = logging.getLogger(__name__)


def learning_rate(config: TrainConfig, iteration: int) -> float:
    """Base lr x linear warm-up factor x gamma ** (number of steps passed)."""
    factor = 1.0
    if iteration < config.warmup_iters:
        alpha = iteration / config.warmup_iters
        factor = config.warmup_factor * (1.0 - alpha) + alpha
    decays = sum(1 for s in config.steps if iteration >= s)
    return config.base_lr * factor * config.gamma**decays


def make_optimizer(model: Detector, config: TrainConfig) -> torch.optim.SGD:
    """SGD; biases at 2x lr without weight decay (Caffe lr_mult 2 / decay_mult 0)."""
    weights: list[torch.nn.Parameter] = []
    biases: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (biases if name.endswith(".bias") else weights).append(p)
    groups = [
        {"params": weights, "lr_mult": 1.0, "weight_decay": config.weight_decay},
        {"params": biases, "lr_mult": 2.0, "weight_decay": 0.0},
    ]
    return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum)


@dataclass(frozen=True)
class TrainResult:
    """Outcome of ``Trainer.train``."""

    iteration: int
    weights: Path
    seconds: float
    last_losses: dict[str, float]
    # True when ``should_stop`` ended the run before ``max_iter`` (a checkpoint was saved).
    stopped: bool = False


class Trainer:
    """Trains a Detector on VG-format ground truth and writes canonical checkpoints."""

    def __init__(
        self,
        config: TrainConfig,
        images: Sequence[VGImage],
        objects_vocab: Sequence[str],
        attributes_vocab: Sequence[str],
        out: str | Path,
        *,
        device: str | torch.device = "cpu",
    ) -> None:
        if not images:
            raise ValueError("no training images with objects in the vocabulary")
        self.config = config
        self.images = list(images)
        self.out = Path(out)
        self.device = torch.device(device)
        self.spec = build_spec(config, objects_vocab, attributes_vocab)
        self.model = Detector(self.spec)
        init_weights(self.model, config, config.seed)
        self.model.to(self.device).train()
        self.data_config = ExtractionConfig(min_size=config.min_size, max_size=config.max_size)
        self.iteration = 0
        self.optimizer: torch.optim.SGD | None = None

    # -- set-up ---------------------------------------------------------------------------

    def start(self, *, resume: bool = False, init: str | Path | None = None) -> None:
        """Fresh start (optional partial init, BN calibration) or resume from the latest
        checkpoint in ``out``; then freezes stages and builds the optimiser."""
        point = latest_checkpoint(self.out) if resume else None
        if point is not None:
            self._restore_weights(point.weights, point.bbox_pred)
            self.iteration = point.iteration
        else:
            if init is not None:
                self._init_from(init)
            if self.config.calibrate_bn:
                self._calibrate()
        frozen = freeze_stages(self.model, self.config.freeze_at)
        logger.info("frozen parameters: %d tensors", len(frozen))
        self.optimizer = make_optimizer(self.model, self.config)
        if point is not None:
            self.optimizer.load_state_dict(point.optimizer)
            logger.info("resumed at iteration %d from %s", self.iteration, point.weights)

    def _restore_weights(self, weights: Path, bbox_pred: dict[str, torch.Tensor]) -> None:
        loaded = load_canonical(weights)
        state = from_canonical(loaded.state_dict, export_scale(self.config))
        state.update({k: bbox_pred[k] for k in BBOX_PRED_KEYS})
        self.model.load_state_dict(state, strict=True)

    def _init_from(self, path: str | Path) -> None:
        """Copies every tensor of a canonical file whose key and shape match (e.g. a backbone)."""
        source = load_canonical(path).state_dict
        own = self.model.state_dict()
        taken = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
        own.update(taken)
        self.model.load_state_dict(own, strict=True)
        logger.info("initialised %d of %d tensors from %s", len(taken), len(own), path)

    def _calibrate(self, count: int = 8) -> None:
        samples = [load_sample(im, self.data_config, flip=False) for im in self.images[:count]]
        h = min(s.size[0] for s in samples)
        w = min(s.size[1] for s in samples)
        batch = torch.stack([s.image[:, :h, :w] for s in samples]).to(self.device)
        rois = [
            torch.cat([torch.full((len(s.gt_boxes), 1), float(i)), s.gt_boxes], dim=1)
            for i, s in enumerate(samples)
        ]
        calibrate_frozen_bn(self.model, batch, torch.cat(rois).to(self.device))

    # -- loop -----------------------------------------------------------------------------

    def _samples(self, iteration: int) -> list[TrainSample]:
        cfg = self.config
        draws = draws_for_iteration(
            iteration, cfg.ims_per_batch, len(self.images), cfg.seed, cfg.flip
        )
        return [load_sample(self.images[i], self.data_config, flip=f) for i, f in draws]

    def step(self) -> dict[str, float]:
        """One SGD iteration over ``ims_per_batch`` images; returns the mean losses."""
        if self.optimizer is None:
            raise RuntimeError("call start() before step()")
        cfg = self.config
        lr = learning_rate(cfg, self.iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_mult"]
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.iteration)
        self.optimizer.zero_grad(set_to_none=True)
        totals = dict.fromkeys(LOSS_NAMES, 0.0)
        for sample in self._samples(self.iteration):
            losses = training_losses(self.model, sample, cfg, generator)
            total = sum(losses.values(), torch.zeros((), device=self.device))
            (total / cfg.ims_per_batch).backward()  # type: ignore[no-untyped-call]
            for k, v in losses.items():
                totals[k] += float(v.detach()) / cfg.ims_per_batch
        if cfg.clip_grad_norm is not None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        self.optimizer.step()
        self.iteration += 1
        totals["total"] = sum(totals[k] for k in LOSS_NAMES)
        totals["lr"] = lr
        return totals

    def checkpoint(self) -> Path:
        """Writes a checkpoint of the current iteration; returns the canonical weights path."""
        if self.optimizer is None:
            raise RuntimeError("call start() before checkpoint()")
        config = dataclasses.asdict(self.config)
        return save_checkpoint(
            self.out,
            self.iteration,
            self.model,
            self.spec,
            self.optimizer,
            config,
            export_scale(self.config),
        )

    def train(
        self,
        max_iter: int | None = None,
        *,
        progress: bool = True,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Runs until ``max_iter`` (default: the config's), checkpointing on the way.

        ``should_stop`` is asked after every iteration (e.g. "a SIGTERM arrived"); when it says
        yes, the current iteration is checkpointed and the run ends with ``stopped=True``.
        """
        end = self.config.max_iter if max_iter is None else max_iter
        start_time, running = time.perf_counter(), dict[str, float]()
        bar = tqdm(total=end, initial=self.iteration, disable=not progress, desc="train")
        weights, stopped = None, False
        logger.info("training from iteration %d to %d", self.iteration, end)
        while self.iteration < end:
            losses = self.step()
            if not all(math.isfinite(v) for v in losses.values()):
                raise FloatingPointError(f"non-finite loss at iteration {self.iteration}: {losses}")
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
            bar.update(1)
            bar.set_postfix({k: f"{running[k]:.3f}" for k in ("total", *LOSS_NAMES)})
            if self.iteration % 50 == 0:
                logger.info(
                    "iter %d lr %.5f %s",
                    self.iteration,
                    losses["lr"],
                    " ".join(f"{k} {running[k]:.4f}" for k in ("total", *LOSS_NAMES)),
                )
            stopped = should_stop is not None and should_stop() and self.iteration < end
            if (
                stopped
                or self.iteration % self.config.checkpoint_every == 0
                or self.iteration == end
            ):
                weights = self.checkpoint()
            if stopped:
                break
        bar.close()
        if weights is None:
            weights = self.checkpoint()
        seconds = time.perf_counter() - start_time
        return TrainResult(self.iteration, weights, seconds, running, stopped)
