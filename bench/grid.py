"""Extra cost of grid features per image: FLOPs (ResNet-101 C4) and measured CPU time.

    nice python bench/grid.py [--grid 7] [--images 12] [--threads 2] [--out bench/results/grid.md]

Two candidates for a G x G grid from the detector's one pass (docs/grids.md):

* ``res5-map``: the RoI head's res5 (stride 1, dilated, as on RoIs) run over the whole res4
  map, average-pooled to G x G: 2048-d cells in the region features' own space (what
  ``Detector.grid`` does);
* ``res4-pool``: the res4 map (1024-d) average-pooled to G x G: no extra network.

FLOPs: ``torch.utils.flop_counter`` on meta tensors of the full ResNet-101 C4 model at a
600 x 800 input (res4 38 x 50) and 300 proposals (the RoI head's res5 on 300 x 14 x 14).
CPU time: (1) the packaged demo detector end to end (``Extractor.extract``, grid 0 vs G) on
synthetic scenes; (2) the full-width ResNet-101 grid branch alone (random weights) on one
600 x 800 res4 map, beside res5 on 10 RoIs (scaled x30 to 300 proposals, stated as such).
Medians of wall-clock repeats; the machine is shared, so numbers are indicative.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.detector.config import ArchConfig, Conventions, ModelSpec
from butd.detector.model import Detector

H, W, PROPOSALS = 600, 800, 300


def flops(fn, *args) -> float:  # type: ignore[no-untyped-def]
    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return float(counter.get_total_flops())


def r101_flops(g: int) -> dict[str, float]:
    with torch.device("meta"):
        model = Detector(ModelSpec(arch=ArchConfig(), conventions=Conventions()))
        image = torch.empty(1, 3, H, W)
        res4 = model.backbone(image)
        rois = torch.empty(PROPOSALS, 1024, 14, 14)
        out = {
            "backbone (res1-res4)": flops(model.backbone, image),
            "rpn head": flops(model.rpn.head, res4),
            f"RoI res5 x {PROPOSALS}": flops(model.roi_heads.res5, rois),
            "grid res5-map": flops(
                lambda x: F.adaptive_avg_pool2d(model.roi_heads.res5(x), g), res4
            ),
            "grid res4-pool": flops(lambda x: F.adaptive_avg_pool2d(x, g), res4),
        }
    out["res4 map"] = float(res4.shape[2] * res4.shape[3])
    return out


def median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def demo_times(g: int, n: int, repeats: int = 7) -> tuple[float, float]:
    """Median seconds per image without and with the grid, runs interleaved (plain, grid,
    plain, ...) so that the shared machine's load drifts over both alike."""
    import numpy as np

    from butd.detector.extractor import Extractor

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (240, 320, 3), dtype=np.uint8) for _ in range(n)]
    ids = [str(i) for i in range(n)]
    plain = Extractor.from_weights(None)
    grid = Extractor.from_weights(None, grid_size=g)
    plain.extract(images, ids), grid.extract(images, ids)  # warm-up
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for key, ext in enumerate((plain, grid)):
            start = time.perf_counter()
            ext.extract(images, ids)
            times[key].append((time.perf_counter() - start) / n)
    return statistics.median(times[0]), statistics.median(times[1])


def r101_times(g: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = Detector(ModelSpec(arch=ArchConfig(), conventions=Conventions())).eval()
    res4 = torch.rand(1, 1024, 38, 50)
    rois = torch.rand(10, 1024, 14, 14)
    with torch.inference_mode():
        grid = median_time(lambda: model.grid(res4, g), 3)
        pool = median_time(lambda: F.adaptive_avg_pool2d(res4, g), 5)
        roi10 = median_time(lambda: model.roi_heads.res5(rois), 3)
    return {"grid res5-map": grid, "grid res4-pool": pool, "RoI res5 x 300 (10 x 30)": roi10 * 30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/grid.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    g = args.grid
    f = r101_flops(g)
    t_plain, t_grid = demo_times(g, args.images)
    t = r101_times(g)
    total = f["backbone (res1-res4)"] + f["rpn head"] + f[f"RoI res5 x {PROPOSALS}"]
    lines = [
        f"# Grid features: extra cost per image (G = {g})",
        "",
        f"Command: `nice python bench/grid.py --grid {g} --images {args.images} "
        f"--threads {args.threads}`",
        "",
        f"## FLOPs, ResNet-101 C4 at {H} x {W} (res4 map {int(f['res4 map'])} cells), "
        f"{PROPOSALS} proposals",
        "",
        "| part | GFLOP | share of the region pass |",
        "| --- | ---: | ---: |",
    ]
    for name in ("backbone (res1-res4)", "rpn head", f"RoI res5 x {PROPOSALS}"):
        lines.append(f"| {name} | {f[name] / 1e9:.1f} | {100 * f[name] / total:.1f} % |")
    lines.append(f"| **region pass (sum)** | {total / 1e9:.1f} | 100 % |")
    for name in ("grid res5-map", "grid res4-pool"):
        lines.append(f"| + {name} | {f[name] / 1e9:.3f} | +{100 * f[name] / total:.2f} % |")
    lines += [
        "",
        f"## CPU time ({args.threads} threads, shared machine)",
        "",
        "| measurement | seconds | extra |",
        "| --- | ---: | ---: |",
        f"| demo detector, extract per image, regions only | {t_plain:.4f} | |",
        f"| demo detector, extract per image, + {g}x{g} grid | {t_grid:.4f} | "
        f"+{100 * (t_grid / t_plain - 1):.1f} % |",
    ]
    for name, value in t.items():
        lines.append(f"| ResNet-101 (random weights) {name} | {value:.3f} | |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
