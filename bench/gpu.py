"""Everything that needs a GPU, in one run: tests, images/s per mode, end to end, deviation.

    python bench/gpu.py                       # on a GPU machine: cuda, ~4-6 minutes
    python bench/gpu.py --device cpu --tiny   # the same script end to end on CPU, seconds

Writes ``bench/results/gpu-<date>.md`` (``--out`` to choose) with:

1. ``pytest tests/gpu`` (CUDA only).
2. images/s of ``Extractor.extract`` in fp32 (TF32 off), fp16 and bf16: batch 1 and batched at
   600x1000 (a real photo tiled to that size), and batched on mixed COCO-like shapes (real
   photos resized to ``bench/coco_sizes.py`` sizes).
3. End to end: an in-process worker with a private redis-server drains a job of JPEG files
   into sealed, indexed shards (``bench/pipeline.worker_rate``), fp32 and bf16.
4. Deviation of fp16 / bf16 from strict fp32 on real photos (``skimage.data``): the fraction
   of fp32's selected boxes that the fast mode selects identically (every coordinate within
   0.01 px), label and attribute agreement on those boxes, and the relative feature error
   ||f_fast - f_fp32|| / ||f_fp32|| on them (max and mean).

Weights: ``--weights`` (a registry name or canonical file) when given and present; else the
first VG checkpoint of the registry that has been fetched; else a synthetic full-size
ResNet-101 checkpoint with random weights. Timings are valid with random weights (same
arithmetic); deviation figures then describe random weights, not the trained model, and the
report says so. ``--tiny``: the narrow test model at a tiny input scale (for the CPU test).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.coco_sizes import coco_like_sizes  # noqa: E402
from bench.pipeline import PHOTOS, photo_rgb, worker_rate, write_images  # noqa: E402
from butd.detector.config import ModelSpec  # noqa: E402
from butd.detector.extractor import Extractor  # noqa: E402

log = logging.getLogger("bench.gpu")

VG_WEIGHTS = ("caffe-10-100", "milvlg-r101-k10-100", "airsplay-attr-10-100", "caffe-36")
PRECISIONS = ("fp32", "fp16", "bf16")
IDENTICAL_PX = 0.01  # a fast-mode box equals an fp32 box when every coordinate is this close


# --- the model ------------------------------------------------------------------------------


def load_model(weights: str | None, tiny: bool) -> tuple[Any, str, bool]:
    """(Detector on the CPU, description, trained?)."""
    from tests.tiny_weights import random_detector

    if tiny:
        return random_detector(seed=0), "tiny random test model (narrow, not trained)", False
    from butd.detector.model import Detector
    from butd.detector.weights import WeightsError, load, resolve

    for name in [weights] if weights else VG_WEIGHTS:
        try:
            loaded = load(resolve(name))
        except WeightsError as exc:
            log.info("weights %s not available: %s", name, exc)
            continue
        model = Detector(loaded.spec)
        model.load_state_dict(loaded.state_dict, strict=True)
        return model, f"{name} ({loaded.spec.description})", True
    if weights:
        raise SystemExit(f"weights {weights!r} are not available")
    spec = ModelSpec(
        objects_vocab=tuple(f"object{i}" for i in range(1600)),
        attributes_vocab=tuple(f"attribute{i}" for i in range(400)),
        description="synthetic full-size ResNet-101, random weights",
    )
    return random_detector(spec, seed=0), spec.description, False


def extractor(model: Any, device: str, precision: str, batch: int, tiny: bool) -> Extractor:
    config = model.spec.default_extraction().replace(precision=precision)
    if tiny:
        config = config.replace(rpn_pre_nms_topk=300, rpn_post_nms_topk=30)
    return Extractor(model, config=config, weights_sha256="b" * 64, device=device, batch_size=batch)


# --- inputs ---------------------------------------------------------------------------------


def bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[:, :, ::-1])


def photo_600x1000(tiny: bool) -> np.ndarray:
    """A real photo tiled to 600x1000 (scale 1 under the Caffe rule); 96x160 when tiny."""
    rgb = photo_rgb("coffee")
    tiled = np.tile(rgb, (2, 2, 1))[:600, :1000]
    return bgr(tiled[::6, ::6] if tiny else tiled)


def mixed_photos(n: int, tiny: bool) -> list[np.ndarray]:
    """``n`` real photos resized to COCO-like sizes (a tenth of them when tiny)."""
    from PIL import Image

    out = []
    for i, (w, h) in enumerate(coco_like_sizes(n, seed=2)):
        size = (max(w // 10, 16), max(h // 10, 16)) if tiny else (w, h)
        rgb = Image.fromarray(photo_rgb(PHOTOS[i % len(PHOTOS)])).convert("RGB").resize(size)
        out.append(bgr(np.asarray(rgb)))
    return out


# --- measurements ---------------------------------------------------------------------------


def rate(ext: Extractor, images: list[np.ndarray], repeats: int) -> float:
    """Median images/s of ``extract(images)`` after one warm-up call."""
    ids = [str(i) for i in range(len(images))]
    ext.extract(images, ids)
    runs = []
    for _ in range(repeats):
        sync(ext.device)
        start = time.perf_counter()
        ext.extract(images, ids)
        sync(ext.device)
        runs.append(len(images) / (time.perf_counter() - start))
    return statistics.median(runs)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: Any, args: argparse.Namespace) -> list[str]:
    """Markdown rows: images/s per precision, batch 1 / batched at 600x1000 / mixed shapes."""
    rows = [
        f"| precision | batch 1, 600x1000 | batch {args.batch}, 600x1000 "
        f"| batch {args.batch}, mixed shapes |",
        "|---|---|---|---|",
    ]
    big = photo_600x1000(args.tiny)
    mixed = mixed_photos(args.mixed, args.tiny)
    for precision in args.precisions:
        try:
            one = rate(extractor(model, args.device, precision, 1, args.tiny), [big], args.repeats)
            ext = extractor(model, args.device, precision, args.batch, args.tiny)
            batched = rate(ext, [big] * args.batch, args.repeats)
            mix = rate(ext, mixed, max(1, args.repeats // 2))
        except RuntimeError as exc:  # e.g. fp16 autocast unsupported on this device
            rows.append(f"| {precision} | not run: {exc} | | |")
            continue
        rows.append(f"| {precision} | {one:.1f} | {batched:.1f} | {mix:.1f} |")
        print(rows[-1], flush=True)
    return rows


def end_to_end(model: Any, args: argparse.Namespace) -> list[str]:
    """Markdown rows: worker images/s from JPEG files to sealed, indexed shards."""
    if shutil.which("redis-server") is None:
        return ["not run: no redis-server on PATH"]
    rows = ["| precision | images | images/s | images per CPU-second |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        sizes = coco_like_sizes(args.e2e + args.batch, seed=3)
        if args.tiny:
            sizes = [(max(w // 10, 16), max(h // 10, 16)) for w, h in sizes]
        paths = write_images(Path(tmp) / "images", sizes)
        for precision in [p for p in args.precisions if p in ("fp32", "bf16")]:
            ext = extractor(model, args.device, precision, args.batch, args.tiny)
            got = worker_rate(ext, paths, args.batch, load_threads=-1)
            rows.append(
                f"| {precision} | {got['images']} | {got['images_per_s']:.1f} | "
                f"{got['images_per_cpu_s']:.1f} |"
            )
            print(rows[-1], flush=True)
    return rows


def deviation(model: Any, args: argparse.Namespace) -> list[str]:
    """Markdown rows: fp16 / bf16 against strict fp32 on real photos."""
    photos = [bgr(photo_rgb(p)) for p in PHOTOS[: args.photos]]
    if args.tiny:
        photos = [p[::4, ::4].copy() for p in photos]
    ids = [str(i) for i in range(len(photos))]
    ref = extractor(model, args.device, "fp32", args.batch, args.tiny).extract(photos, ids)
    rows = [
        "| mode | boxes identical | labels agree | attributes agree | max rel. feature error "
        "| mean rel. feature error |",
        "|---|---|---|---|---|---|",
    ]
    for precision in [p for p in args.precisions if p != "fp32"]:
        try:
            fast = extractor(model, args.device, precision, args.batch, args.tiny).extract(
                photos, ids
            )
        except RuntimeError as exc:
            rows.append(f"| {precision} | not run: {exc} | | | | |")
            continue
        rows.append(f"| {precision} | " + " | ".join(compare(ref, fast)) + " |")
        print(rows[-1], flush=True)
    return rows


def compare(ref: list[Any], fast: list[Any]) -> list[str]:
    """Identical-box fraction, label / attribute agreement and feature error, all images."""
    same = total = labels = attrs = 0
    errors: list[np.ndarray] = []
    for a, b in zip(ref, fast, strict=True):
        total += a.num_boxes
        if not (a.num_boxes and b.num_boxes):
            continue
        dist = np.abs(a.boxes[:, None, :] - b.boxes[None, :, :]).max(axis=2)  # (Na, Nb)
        j = dist.argmin(axis=1)
        hit = dist[np.arange(a.num_boxes), j] <= IDENTICAL_PX
        same += int(hit.sum())
        labels += int((a.objects_id[hit] == b.objects_id[j[hit]]).sum())
        attrs += int((a.attrs_id[hit] == b.attrs_id[j[hit]]).sum())
        fa, fb = a.features[hit].astype(np.float64), b.features[j[hit]].astype(np.float64)
        norm = np.maximum(np.linalg.norm(fa, axis=1), 1e-12)
        errors.append(np.linalg.norm(fb - fa, axis=1) / norm)
    err = np.concatenate(errors) if errors else np.zeros(0)
    return [
        f"{same}/{total} ({100 * same / max(total, 1):.1f} %)",
        f"{100 * labels / max(same, 1):.1f} %",
        f"{100 * attrs / max(same, 1):.1f} %",
        f"{err.max():.2e}" if err.size else "-",
        f"{err.mean():.2e}" if err.size else "-",
    ]


def gpu_tests(args: argparse.Namespace) -> list[str]:
    if args.device == "cpu" or args.skip_tests:
        return ["not run (CPU device or --skip-tests)"]
    cmd = [sys.executable, "-m", "pytest", "tests/gpu", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240)
    tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
    return [f"exit status {done.returncode}:", "", "```", *tail, "```"]


# --- report ---------------------------------------------------------------------------------


def header(args: argparse.Namespace, what: str, trained: bool) -> list[str]:
    device = (
        torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor()
    )
    lines = [
        f"# GPU benchmark, {datetime.date.today()}",
        "",
        f"- command: `python bench/gpu.py {' '.join(sys.argv[1:])}`",
        f"- device: {args.device} ({device or platform.machine()}), torch {torch.__version__}",
        f"- weights: {what}",
    ]
    if not trained:
        lines.append(
            "- **random weights**: images/s are valid (same arithmetic as the trained model); "
            "the deviation figures describe random weights, not the trained detector"
        )
    return [*lines, ""]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    ap.add_argument("--weights", default=None, help="registry name or canonical file")
    ap.add_argument("--tiny", action="store_true", help="the narrow test model, tiny inputs")
    ap.add_argument("--batch", type=int, default=8, help="images per model call when batched")
    ap.add_argument("--mixed", type=int, default=32, help="images of the mixed-shape run")
    ap.add_argument("--e2e", type=int, default=256, help="images of the end-to-end job")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--photos", type=int, default=len(PHOTOS), help="photos of the deviation")
    ap.add_argument(
        "--precisions", default=",".join(PRECISIONS), help="comma-separated; fp32 is the reference"
    )
    ap.add_argument("--skip-tests", action="store_true", help="do not run tests/gpu")
    ap.add_argument("--out", type=Path, default=None, help="report file (.md)")
    args = ap.parse_args(argv)
    args.precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = set(args.precisions) - set(PRECISIONS)
    if unknown or "fp32" not in args.precisions:
        ap.error(f"--precisions: fp32 and any of fp16, bf16; got {args.precisions}")
    return args


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    logging.basicConfig(level=logging.WARNING)
    start = time.perf_counter()
    model, what, trained = load_model(args.weights, args.tiny)
    out = args.out or REPO / "bench" / "results" / f"gpu-{datetime.date.today()}.md"
    lines = header(args, what, trained)
    sections = (
        ("tests/gpu", gpu_tests),
        ("images/s of the extractor", lambda a: throughput(model, a)),
        ("end to end: JPEG files to sealed shards, with Redis", lambda a: end_to_end(model, a)),
        ("fast modes against strict fp32, real photos", lambda a: deviation(model, a)),
    )
    for title, run in sections:
        print(f"## {title}", flush=True)
        lines += [f"## {title}", "", *run(args), ""]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join(lines) + "\n")  # what is done survives a timeout
    lines.append(f"Total {time.perf_counter() - start:.0f} s.")
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
