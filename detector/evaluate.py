"""``butd evaluate``: a weight file run over a Visual Genome style directory and scored.

The composition of the evaluation: canonical weights -> :func:`butd.detector.train.detect.detect`
(scored class-specific detections) -> :mod:`butd.detector.train.metrics` (object and attribute mAP,
attribute accuracy) -> a summary and a per-class CSV table. The arrows run one way: metrics
know nothing of the model, the detection runner imports only the metrics' ``ImageDetections``.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from tqdm import tqdm

from butd.detector.model import Detector
from butd.detector.train.detect import detect
from butd.detector.train.metrics import EvalResult, GroundTruth, evaluate
from butd.detector.train.vg import Vocab, load_vg
from butd.detector.weights.canonical import load
from butd.images import decode_image

logger = logging.getLogger(__name__)


def write_csv(result: EvalResult, path: str | Path) -> None:
    """Per-class table: kind, index, name, ap, num_gt."""
    with Path(path).open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["kind", "index", "name", "ap", "num_gt"])
        for r in result.rows:
            writer.writerow([r.kind, r.index, r.name, f"{r.ap:.6f}", r.num_gt])


def evaluate_weights(
    weights: str | Path,
    data: str | Path,
    *,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Runs a canonical weight file over a VG-format directory and scores it.

    The data's vocabularies are read from ``data`` when present, else the weights' own; the
    image scale is the weights' ``extraction_defaults``.
    """
    loaded = load(weights)
    spec = loaded.spec
    model = Detector(spec)
    model.load_state_dict(loaded.state_dict, strict=True)
    model.to(torch.device(device)).eval()
    images = load_vg(
        data, Vocab.from_lines(spec.objects_vocab), Vocab.from_lines(spec.attributes_vocab)
    )[:limit]
    config = spec.default_extraction()
    dets, gts = [], []
    for im in tqdm(images, disable=not progress, desc="evaluate"):
        dets.append(detect(model, decode_image(im.path.read_bytes()), config))
        gts.append(GroundTruth(im.boxes, im.classes, im.attributes))
    result = evaluate(
        dets, gts, spec.objects_vocab, spec.attributes_vocab, plus_one=spec.conventions.plus_one
    )
    logger.info("evaluated %s on %d images: %s", weights, len(images), result.summary())
    return result
