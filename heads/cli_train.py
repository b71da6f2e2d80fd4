"""Training heads on real feature files (``butd heads train caption|vqa``).

Regions are read lazily per batch from the ragged HDF5 file (``butd.store.h5.FeatureFile``): a COCO
feature file does not fit in memory.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from butd.heads.ban import BAN, BANConfig
from butd.heads.captioners import AdaptiveCore, CaptionerConfig
from butd.heads.data import (
    CaptionItem,
    VQAItem,
    build_answer_set,
    caption_examples,
    read_coco_captions,
    read_karpathy,
    read_vqa,
    vqa_examples,
)
from butd.heads.decoding import Captioner
from butd.heads.metrics.captions import CiderD
from butd.heads.objectives import caption_batch_loss, scst_loss, vqa_loss
from butd.heads.regions import RegionBatch, collate_records, grid_as_regions
from butd.heads.train import TrainSettings, fit
from butd.heads.vocab import Vocabulary, tokenize_caption, tokenize_question
from butd.heads.vqa import UpDownVQA, VQAConfig

logger = logging.getLogger(__name__)
Item = TypeVar("Item", CaptionItem, VQAItem)


class FileRegions:
    """Row-indexed view of a feature file: ``select(rows)`` reads and pads those images."""

    def __init__(
        self,
        path: Path,
        image_ids: Sequence[str],
        l2_normalise: bool,
        device: torch.device | str = "cpu",
        grid_size: int = 0,
    ) -> None:
        from butd.store.h5 import FeatureFile

        self.file = FeatureFile(path)
        self.image_ids = list(image_ids)
        self.l2 = l2_normalise
        self.device = torch.device(device)
        self.grid_size = grid_size

    def select(self, rows: torch.Tensor | Sequence[int]) -> RegionBatch:
        """Padded batch of images ``rows`` (their grid cells with ``grid_size``), on ``device``."""
        ids = [self.image_ids[int(r)] for r in torch.as_tensor(rows).tolist()]
        records = [self.file.get(i) for i in ids]
        if self.grid_size:
            records = [grid_as_regions(r, self.grid_size) for r in records]
        batch = collate_records(records, l2_normalise=self.l2)
        return batch.to(self.device)


def join_items(path: Path, items: Sequence[Item]) -> tuple[list[Item], list[str]]:
    """Annotations re-keyed to the feature file's ids (``butd.store.image_ids.join_ids``: COCO /
    VQA integers find ``COCO_..._000000000042.jpg``, synth ``"1"`` finds ``000001.jpg``).

    Returns:
        The items whose image has features (``image_id`` = the stored id), and the stored ids
        they use, in first-use order.

    Raises:
        SystemExit: no annotated image has features (the message shows an id of each side).
    """
    from butd.store.h5 import FeatureFile
    from butd.store.image_ids import join_ids

    with FeatureFile(path) as ff:
        joined = join_ids((it.image_id for it in items), ff.ids(), ff.id_policy.get("rule", ""))
    message = joined.summary(str(path))
    if not joined.matched:
        raise SystemExit(f"butd heads train: no annotated image has features: {message}")
    if joined.missing:
        logger.warning(message)
    else:
        logger.info(message)
    kept = [replace(it, image_id=joined.matched[it.image_id]) for it in items
            if it.image_id in joined.matched]  # fmt: skip
    return kept, list(dict.fromkeys(it.image_id for it in kept))


def _feature_dim(path: Path) -> int:
    from butd.store.h5 import FeatureFile

    with FeatureFile(path) as ff:
        return int(ff.feature_dim)


def _grid_size(args: argparse.Namespace) -> int:
    """G of the file's grids with ``--grid`` (SystemExit when it has none), else 0; ``--cbam``
    needs ``--grid``."""
    from butd.store.h5 import FeatureFile

    if getattr(args, "cbam", False) and not getattr(args, "grid", False):
        raise SystemExit("--cbam refines grid features: add --grid (a --grid-size feature file)")
    if not getattr(args, "grid", False):
        return 0
    with FeatureFile(args.features) as ff:
        g = ff.grid_size
    if not g:
        raise SystemExit(f"{args.features} has no grid features: extract it with --grid-size G")
    return int(g)


def train_vqa(args: argparse.Namespace) -> None:
    """Answer set (≥ 9 occurrences), question vocabulary, then BCE training."""
    items, ids = join_items(args.features, read_vqa(args.questions, args.annotations))
    rows = {i: r for r, i in enumerate(ids)}
    vocab = Vocabulary.build((tokenize_question(it.question) for it in items), min_count=1)
    answers = build_answer_set((a for it in items for a in it.answers), args.min_count or 9)
    ex = vqa_examples(items, rows, vocab, answers)
    head = args.head or "updown"
    d = _feature_dim(args.features)
    g = _grid_size(args)
    if head == "ban" and g:
        raise SystemExit("--grid: the BAN head reads region sets only here; use --head updown")
    sizes = {} if args.hidden is None else {"hidden_dim": args.hidden}
    if head == "ban":
        cfg: Any = BANConfig(feature_dim=d, **sizes)
        model: torch.nn.Module = BAN(len(vocab), len(answers), cfg)
    else:
        if args.hidden is not None:
            sizes["question_dim"] = args.hidden
        variant = "hengyuan" if head == "updown_relu" else "paper"
        cfg = VQAConfig(variant=variant, feature_dim=d, grid_size=g, cbam=bool(args.cbam), **sizes)
        model = UpDownVQA(len(vocab), len(answers), cfg)
    recipe = args.recipe or ("ban" if head == "ban" else "hengyuan")
    batch = args.batch_size or (256 if head == "ban" else 512)
    settings = TrainSettings(recipe, args.steps, batch, steps_per_epoch=max(1, len(ex) // batch))
    device = torch.device(args.device)
    model.to(device)
    ex = ex.to(device)
    regions = FileRegions(args.features, ids, l2_normalise=True, device=device, grid_size=g)
    meta = {"task": "vqa", "head": "ban" if head == "ban" else "updown", "config": asdict(cfg),
            "vocab": vocab.words, "answers": answers, "l2_normalise": True,
            "note": getattr(args, "note", "")}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    fit(model, lambda idx: vqa_loss(model, regions, ex, idx), len(ex), settings, args.out, meta)


def _caption_items(path: Path) -> list[Any]:
    import json

    head = json.loads(path.read_text())
    return (
        read_karpathy(path)
        if "images" in head and "annotations" not in head
        else read_coco_captions(path)
    )


def train_caption(args: argparse.Namespace) -> None:
    """Vocabulary (≥ 5 occurrences), XE training, then optional SCST with train-set CIDEr-D."""
    items, ids = join_items(args.features, _caption_items(args.annotations))
    rows = {i: r for r, i in enumerate(ids)}
    vocab = Vocabulary.build(
        (tokenize_caption(c) for it in items for c in it.captions), args.min_count or 5
    )
    ex = caption_examples(items, rows, vocab)
    h = args.hidden
    sizes = {} if h is None else {"lstm_dim": h, "att_dim": max(h // 2, 1), "embed_dim": h}
    g = _grid_size(args)
    if args.cbam and args.head not in (None, "updown", "sca"):
        raise SystemExit("--cbam is built into the updown and sca captioners")
    cfg = CaptionerConfig(
        kind=args.head or "updown",
        feature_dim=_feature_dim(args.features),
        grid_size=g,
        cbam=bool(args.cbam),
        **sizes,
    )
    device = torch.device(args.device)
    model = Captioner(len(vocab), cfg).to(device)
    ex = ex.to(device)
    recipe = args.recipe or "updown_caffe"
    batch = args.batch_size or 100
    settings = TrainSettings(recipe, args.steps, batch, steps_per_epoch=max(1, len(ex) // batch))
    regions = FileRegions(args.features, ids, l2_normalise=False, device=device, grid_size=g)
    meta = {"task": "caption", "head": cfg.kind, "config": asdict(cfg), "vocab": vocab.words,
            "note": getattr(args, "note", "")}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    lam = args.ds_lambda if cfg.kind == "sat" else 0.0
    core = model.core
    phases = [(args.steps, True)]
    if isinstance(core, AdaptiveCore):
        # The first part without the visual sentinel, which otherwise takes every word before
        # the region attention has learnt anything (docs/heads.md, benchmark).
        warm = int(args.steps * args.sentinel_warmup)
        phases = [(warm, False), (args.steps, True)] if warm > 0 else phases
        meta["sentinel_warmup_steps"] = warm
    if cfg.kind == "sat":
        meta["ds_lambda"] = lam
    for until, sentinel in phases:
        if isinstance(core, AdaptiveCore):
            core.use_sentinel = sentinel and cfg.sentinel
        fit(
            model,
            lambda idx: caption_batch_loss(model, regions, ex, idx, lam),
            len(ex),
            settings,
            args.out,
            meta,
            until=until,
        )
    if args.scst_steps > 0:
        _scst(model, regions, ex.references, vocab, args, meta)


def _scst(model: Captioner, regions: FileRegions, refs: dict[int, list[str]], vocab: Vocabulary,
          args: argparse.Namespace, meta: dict[str, Any]) -> None:  # fmt: skip
    """Anderson's SCST stage: beam-5 captions, mean-of-beam baseline, train-set CIDEr-D df."""
    tok = {r: [" ".join(tokenize_caption(c)) for c in cs] for r, cs in refs.items()}
    cider = CiderD(list(tok.values()))
    row_list = sorted(tok)
    settings = TrainSettings("scst_caffe", args.scst_steps, 12)
    out = args.out / "scst"
    out.mkdir(parents=True, exist_ok=True)

    def loss(idx: torch.Tensor) -> torch.Tensor:
        rows = [row_list[int(i)] for i in idx]
        value, reward = scst_loss(model, regions.select(rows), [tok[r] for r in rows], cider, vocab)
        logger.debug("scst mean CIDEr-D %.3f", reward)
        return value

    fit(model, loss, len(row_list), settings, out, meta)
