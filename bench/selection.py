"""Time of the selection rule: vectorised ``select_regions`` versus the loop of 1600 NMS calls.

    python bench/selection.py [--proposals 300] [--classes 1600] [--repeats 7] [--loop-repeats 3]
                           [--threads N]

Inputs are realistic in shape and statistics: 300 proposals clustered around 15 "objects" in a
640x480 image (so per-class NMS has suppression chains), and class probabilities = softmax of
N(0, 2) logits over 1601 columns, raised on the object's two classes for the proposals of one
object (+2..8, +0..5), and on the background for one proposal in five. The baseline is the
generate_tsv.py loop (``tests/unit/reference_nms.py``: 1600 sequential NumPy NMS calls, as Caffe
and MILVLG run it on the CPU). Both results are checked to be identical. Wall-clock medians after
one warm-up run of the vectorised code.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def make_inputs(r: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Proposals (R, 4) float32 and class probabilities (R, K + 1) float32.

    Proposals scatter around R/20 objects; the proposals of one object share its two likeliest
    classes (as a detector's overlapping boxes do), one in five leans to the background.
    """
    rng = np.random.default_rng(seed)
    n_obj = max(r // 20, 1)
    obj = rng.integers(0, n_obj, r)  # object of each proposal
    centres = rng.uniform([40, 40], [600, 440], (n_obj, 2))
    ctr = centres[obj] + rng.normal(0, 15, (r, 2))
    half = rng.uniform(10, 90, (r, 2))
    boxes = np.clip(np.concatenate([ctr - half, ctr + half], axis=1), 0, [639, 479, 639, 479])
    labels = rng.integers(1, k + 1, (n_obj, 2))  # primary and secondary class per object
    logits = rng.normal(0, 2.0, (r, k + 1))
    rows = np.arange(r)
    logits[rows, labels[obj, 0]] += rng.uniform(2.0, 8.0, r)
    logits[rows, labels[obj, 1]] += rng.uniform(0.0, 5.0, r)
    logits[rng.random(r) < 0.2, 0] += 6.0
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    return boxes.astype(np.float32), probs.astype(np.float32)


def _median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median wall-clock seconds of ``fn()``, synchronising CUDA around each run."""
    import torch

    runs = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)
        runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def run(
    device: str = "cpu",
    *,
    proposals: int = 300,
    classes: int = 1600,
    repeats: int = 7,
    loop_repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Time the vectorised rule on ``device`` against the NumPy loop on the CPU.

    Args:
        device: torch device of the vectorised run ("cpu", "cuda").
        proposals: R.
        classes: K (the probabilities get K + 1 columns).
        repeats: timed runs of the vectorised rule.
        loop_repeats: timed runs of the loop.
        threads: torch intra-op threads during the run (None = leave as is); restored after.

    Returns:
        ``device``, ``threads``, ``proposals``, ``classes``, ``kept``, ``vectorised_ms`` and
        ``loop_ms`` (medians), ``speedup`` (loop / vectorised), ``identical`` (same indices and
        max_conf as the loop).
    """
    import torch

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = _run(device, proposals, classes, repeats, loop_repeats)
    finally:
        torch.set_num_threads(previous)
    return result


def _run(device: str, proposals: int, classes: int, repeats: int, loop_repeats: int) -> dict:
    """:func:`run` with the thread count already set."""
    import torch

    from butd.detector.select import select_regions
    from tests.unit.reference_nms import reference_select

    boxes, probs = make_inputs(proposals, classes)
    boxes_t = torch.from_numpy(boxes).to(device)
    probs_t = torch.from_numpy(probs).to(device)
    selection = select_regions(boxes_t, probs_t)  # warm-up
    fast = _median_seconds(lambda: select_regions(boxes_t, probs_t), repeats, device)
    loop = _median_seconds(lambda: reference_select(boxes, probs), loop_repeats, "cpu")
    want_idx, want_conf = reference_select(boxes, probs)
    identical = bool(
        np.array_equal(selection.indices.cpu().numpy(), want_idx)
        and np.array_equal(selection.max_conf.cpu().numpy(), want_conf)
    )
    return {
        "device": device,
        "threads": torch.get_num_threads(),
        "proposals": proposals,
        "classes": classes,
        "kept": int(selection.indices.numel()),
        "vectorised_ms": round(fast * 1e3, 2),
        "loop_ms": round(loop * 1e3, 1),
        "speedup": round(loop / fast, 1),
        "identical": identical,
    }


def main() -> None:
    """Command line: time on the CPU, and on CUDA when present."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proposals", type=int, default=300)
    parser.add_argument("--classes", type=int, default=1600)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--loop-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        result = run(
            device,
            proposals=args.proposals,
            classes=args.classes,
            repeats=args.repeats,
            loop_repeats=args.loop_repeats,
            threads=args.threads,
        )
        print(f"selection {device}: {result}")


if __name__ == "__main__":
    main()
