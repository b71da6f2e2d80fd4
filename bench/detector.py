"""Throughput of the full ResNet-101 detector and of the selection step.

    python bench/detector.py [--images N] [--skip-cpu-r101]

Prints:
  * images/s of the full R101 (random weights, real photo resized to 600x1000 by the Caffe rule)
    on CPU, batch 1 and batched;
  * on CUDA when present: fp32 (TF32 off), fp16 and bf16 images/s, batch 1 and batched;
  * the selection step (300 proposals x 1601 classes), vectorised versus 1600 NMS calls
    (``bench/selection.py``).

Timings are wall-clock medians after a warm-up pass; weights are random (same arithmetic cost
as the published ones).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.detector.config import ExtractionConfig, ModelSpec
from butd.detector.extractor import Extractor
from tests.tiny_weights import random_detector


def photo_600x1000() -> np.ndarray:
    """A real photo (skimage ``coffee``, 400x600) tiled to 600x1000 BGR, so s = 1."""
    from skimage import data

    rgb = data.coffee()
    tiled = np.tile(rgb, (2, 2, 1))[:600, :1000]
    return np.ascontiguousarray(tiled[:, :, ::-1])


def time_extract(ext: Extractor, images: list[np.ndarray], repeats: int) -> float:
    """Median images/s of ``ext.extract(images)`` over ``repeats`` runs after one warm-up."""
    ids = [str(i) for i in range(len(images))]
    ext.extract(images[:1], ids[:1])
    runs = []
    for _ in range(repeats):
        if ext.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        ext.extract(images, ids)
        if ext.device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(len(images) / (time.perf_counter() - start))
    return statistics.median(runs)


def r101_extractor(device: str, precision: str, batch_size: int) -> Extractor:
    model = random_detector(ModelSpec(), seed=0)
    config = ExtractionConfig(precision=precision)  # type: ignore[arg-type]
    return Extractor(
        model, config=config, weights_sha256="random", device=device, batch_size=batch_size
    )


def bench_r101(device: str, precisions: list[str], n_images: int, repeats: int) -> None:
    photo = photo_600x1000()
    for precision in precisions:
        for batch in (1, n_images):
            ext = r101_extractor(device, precision, batch)
            images = [photo.copy() for _ in range(batch if batch > 1 else 1)]
            rate = time_extract(ext, images, repeats)
            print(
                f"R101 600x1000  {device:5s} {precision}  batch {batch:2d}: "
                f"{rate:.3g} img/s ({1 / rate:.2f} s/img)"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="batch size of the batched runs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-cpu-r101", action="store_true")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    if not args.skip_cpu_r101:
        bench_r101("cpu", ["fp32"], args.images, args.repeats)
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name()}")
        bench_r101("cuda", ["fp32", "fp16", "bf16"], max(args.images, 16), max(args.repeats, 5))
    from bench.selection import run as bench_select

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"selection {device}: {bench_select(device)}")


if __name__ == "__main__":
    main()
