"""``butd synth``, ``butd train``, ``butd evaluate``: make data, train a detector, score it.

    butd synth --out DIR --images N [--seed S]
    butd train --data DIR --config {demo,vg-r101} --out DIR [--resume] [--max-iter N]
               [--init WEIGHTS] [--device cpu|cuda] [--threads T]
    butd evaluate --data DIR --weights PATH [--csv FILE] [--limit N] [--device cpu|cuda]

``--data`` is a Visual Genome style directory (image_data.json, objects.json,
attributes.json, objects_vocab.txt, attributes_vocab.txt), e.g. one ``butd synth`` wrote.
Training writes ``OUT/checkpoints/iter_*.safetensors`` (canonical weights) with a
``.state.pt`` beside each for ``--resume``, and ``OUT/model.safetensors`` at the end. Ctrl-C or
SIGTERM saves a checkpoint after the iteration in hand, prints it and the ``--resume`` command,
and exits 130 / 143; a second Ctrl-C stops at once.

Handlers import torch lazily so ``butd --help`` stays light.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import signal
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``synth``, ``train`` and ``evaluate`` to the ``butd`` parser."""
    p_synth = subparsers.add_parser(
        "synth", help="write a synthetic scene set (VG layout + captions + VQA)"
    )
    p_synth.add_argument("--out", type=Path, required=True, help="output directory")
    p_synth.add_argument("--images", type=int, required=True, help="number of scenes")
    p_synth.add_argument("--seed", type=int, default=0, help="seed (same seed, same bytes)")
    p_synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_synth.set_defaults(handler=_synth)

    p_train = subparsers.add_parser("train", help="train a detector on VG-format data")
    p_train.add_argument("--data", type=Path, required=True, help="VG-format directory")
    p_train.add_argument("--config", default="demo", help="named config: demo, vg-r101")
    p_train.add_argument("--out", type=Path, required=True, help="run directory")
    p_train.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    p_train.add_argument("--max-iter", type=int, default=None, help="stop early at N")
    p_train.add_argument("--init", type=Path, default=None, help="canonical file to start from")
    p_train.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p_train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.set_defaults(handler=_train)

    p_eval = subparsers.add_parser("evaluate", help="object / attribute mAP@0.5 of weights")
    p_eval.add_argument("--data", type=Path, required=True, help="VG-format directory")
    p_eval.add_argument("--weights", required=True, help="canonical .safetensors file")
    p_eval.add_argument("--csv", type=Path, default=None, help="per-class AP table to write")
    p_eval.add_argument("--limit", type=int, default=None, help="first N images only")
    p_eval.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p_eval.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p_eval.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_eval.set_defaults(handler=_evaluate)


def _synth(args: argparse.Namespace) -> int:
    from butd.detector.synth import write_synthetic_set

    summary = write_synthetic_set(args.out, args.images, args.seed, progress=not args.no_progress)
    print(
        f"wrote {summary.images} images, {summary.objects} objects, {summary.captions} "
        f"captions, {summary.questions} questions to {summary.out}"
    )
    return 0


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _train(args: argparse.Namespace) -> int:
    from butd.detector.train.configs import get_config
    from butd.detector.train.trainer import Trainer
    from butd.detector.train.vg import Vocab, load_vg

    _set_threads(args.threads)
    config = get_config(args.config)
    objects_vocab = Vocab.from_file(args.data / "objects_vocab.txt")
    attributes_vocab = Vocab.from_file(args.data / "attributes_vocab.txt")
    images = load_vg(args.data, objects_vocab, attributes_vocab)
    trainer = Trainer(
        config, images, objects_vocab.names, attributes_vocab.names, args.out, device=args.device
    )
    trainer.start(resume=args.resume, init=args.init)
    with StopSignals() as stop:
        result = trainer.train(args.max_iter, progress=not args.no_progress, should_stop=stop)
    if result.stopped:
        print(
            f"stopped by {stop.name} at iteration {result.iteration} of {config.max_iter}; "
            f"checkpoint {result.weights}\ncontinue with: {resume_command(args)}"
        )
        return 128 + (stop.signum or 0)
    final = args.out / "model.safetensors"
    if result.iteration >= config.max_iter:
        shutil.copyfile(result.weights, final)
    print(
        f"trained to iteration {result.iteration} in {result.seconds:.0f}s; weights "
        f"{final if final.exists() else result.weights}"
    )
    return 0


class StopSignals:
    """While entered, the first SIGINT / SIGTERM only sets a flag (calling the object says
    whether one came), so the loop can checkpoint and stop; a second SIGINT interrupts at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning(
            "%s: saving a checkpoint after this iteration, then stopping (Ctrl-C again to "
            "stop without one)",
            signal.Signals(signum).name,
        )

    def __enter__(self) -> StopSignals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def resume_command(args: argparse.Namespace) -> str:
    """The ``butd train`` command line that continues this run from its last checkpoint."""
    parts = ["butd", "train", "--data", str(args.data), "--config", args.config]
    parts += ["--out", str(args.out), "--resume"]
    for flag, value in (("--max-iter", args.max_iter), ("--device", args.device)):
        if value is not None and not (flag == "--device" and value == "cpu"):
            parts += [flag, str(value)]
    if args.threads is not None:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _evaluate(args: argparse.Namespace) -> int:
    from butd.detector.evaluate import evaluate_weights, write_csv

    _set_threads(args.threads)
    result = evaluate_weights(
        args.weights,
        args.data,
        device=args.device,
        limit=args.limit,
        progress=not args.no_progress,
    )
    if args.csv is not None:
        write_csv(result, args.csv)
    print(json.dumps(result.summary(), indent=2))
    return 0
