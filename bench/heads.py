"""Proof that each head learns: the synthetic benchmark of heads-reference §10 on CPU.

Region features are simulated in the stored record format (``butd.heads.synth``). Every head is
trained for a bounded number of updates and scored on held-out scenes against two controls:
a blind model (features zeroed) and a mean-pooled model without attention; captions also
against the unbound bag-of-attributes oracle. Writes a Markdown table (and JSON) as it goes.

    nice python bench/heads.py --out bench/results/heads.md
    nice python bench/heads.py --grid --out bench/results/heads_grid.md   # grid-feature heads

``--grid`` renders the scenes as 4 x 4 grid maps (``butd.heads.synth.grid_scene``) and trains the
grid heads: Up-Down, Up-Down + CBAM, SCA-CNN, SCA-CNN without channel attention, SCA + CBAM
(captions) and Up-Down / Up-Down + CBAM (VQA), with the same controls.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.heads.benchmark import (
    CAPTION_HEADS,
    GRID_CAPTION_HEADS,
    GRID_VQA_HEADS,
    VQA_HEADS,
    caption_task,
    constant_caption_f1,
    run_caption,
    run_vqa,
    vqa_task,
)
from butd.heads.synth import unbound_oracle

logger = logging.getLogger("bench.heads")
LEGEND = """\
att_hit: % of colour questions whose argmax region shows the asked object (or its duplicate).
att_named: % of colour/shape words in the val references (teacher-forced) whose argmax region
shows an object of that colour/shape. beta_content / beta_function: mean β_t (%) on colour/shape
words and on the other words; adaptive: the sentinel weight (low = looking at regions), SAT: the
selector gate on the context (high = looking). "± x": std over the seeds.
"""
VQA_COLS = ("overall", "color", "shape", "count", "exist", "att_hit")
CAP_COLS = (
    "content_f1", "exact_set", "BLEU-4", "CIDEr-D", "att_named", "beta_content", "beta_function",
)  # fmt: skip


def _cell(row: dict[str, float], col: str) -> str:
    """ "87.7", or "87.7 ± 1.2" (std over seeds) when the row has ``<col>_std``."""
    value = row.get(col)
    if not isinstance(value, float):
        return str(value if value is not None else "–")
    std = row.get(f"{col}_std")
    return f"{value:.1f} ± {std:.1f}" if isinstance(std, float) else f"{value:.1f}"


def over_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of every numeric field over seeds, its std (``<field>_std``, n − 1) and the values."""
    row: dict[str, Any] = {"seeds": len(runs), "example": runs[0].get("example")}
    for key, first in runs[0].items():
        if not isinstance(first, float):
            continue
        values = [float(r[key]) for r in runs]
        row[key] = statistics.fmean(values)
        if len(values) > 1 and key != "seconds":
            row[f"{key}_std"] = statistics.stdev(values)
            row[f"{key}_runs"] = values
    return row


def _table(title: str, cols: tuple[str, ...], rows: dict[str, dict[str, float]]) -> str:
    lines = [
        f"### {title}",
        "",
        "| head | " + " | ".join(cols) + " | seconds |",
        "|" + "---|" * (len(cols) + 2),
    ]
    for name, r in rows.items():
        cells = [_cell(r, c) for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def merge(paths: list[Path], out: Path) -> int:
    """Join the JSON results of runs that split the heads (``--vqa-heads`` / ``--cap-heads``)."""
    results: dict[str, dict[str, dict[str, float]]] = {"vqa": {}, "caption": {}}
    for path in paths:
        part = json.loads(path.read_text())
        for task in results:
            results[task].update(part.get(task, {}))
    header = f"Merged from {', '.join(p.name for p in paths)} (settings: each run's .md).\n\n"
    text = header + _table("VQA (official accuracy, val)", VQA_COLS, results["vqa"])
    text += "\n" + _table("Captions (greedy, val)", CAP_COLS, results["caption"])
    out.write_text(text + "\n" + LEGEND)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dim", type=int, default=256, help="feature size D (2048 real; smaller for CPU)"
    )
    p.add_argument("--hidden", type=int, default=128, help="hidden size of every head")
    p.add_argument(
        "--vqa-scenes", type=int, nargs=2, default=(1000, 200), help="train / val scenes"
    )
    p.add_argument("--cap-scenes", type=int, nargs=2, default=(800, 200), help="train / val scenes")
    p.add_argument("--vqa-steps", type=int, default=1200, help="updates per VQA head (batch 64)")
    p.add_argument("--cap-steps", type=int, default=800, help="updates per caption head (batch 50)")
    p.add_argument("--grid", action="store_true", help="grid-map scenes and the grid heads")
    p.add_argument("--vqa-heads", nargs="*", default=None)
    p.add_argument("--cap-heads", nargs="*", default=None)
    p.add_argument("--cap-lr", type=float, default=1e-3, help="Adam lr of the captioners")
    p.add_argument(
        "--cap-seeds", type=int, default=1, help="train each captioner from this many seeds"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--out", type=Path, default=Path("bench/results/heads.md"))
    p.add_argument("--merge", type=Path, nargs="*", help="only merge these result JSONs into --out")
    args = p.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.vqa_heads is None:
        args.vqa_heads = list(GRID_VQA_HEADS if args.grid else VQA_HEADS)
    if args.cap_heads is None:
        args.cap_heads = list(GRID_CAPTION_HEADS if args.grid else CAPTION_HEADS)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, dict[str, Any]]] = {"vqa": {}, "caption": {}}

    def write() -> None:
        header = (f"D={args.dim}, hidden={args.hidden}, VQA {args.vqa_steps} updates × 64, "
                  f"captions {args.cap_steps} updates × 50 (seeds 0..{args.cap_seeds - 1}: "
                  f"mean ± std), Adam 1e-3, {args.device}, {args.threads} CPU thread(s)"
                  f"{', 4 x 4 grid-map features' if args.grid else ''}\n\n")  # fmt: skip
        text = header + _table("VQA (official accuracy, val)", VQA_COLS, results["vqa"])
        text += "\n" + _table("Captions (greedy, val)", CAP_COLS, results["caption"])
        args.out.write_text(text + "\n" + LEGEND)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))

    vt = vqa_task(args.dim, *args.vqa_scenes, grid=args.grid)
    for name in args.vqa_heads:
        t = time.time()
        results["vqa"][name] = {
            **run_vqa(name, vt, args.vqa_steps, args.hidden, 64, device=args.device),
            "seconds": time.time() - t,
        }
        logger.info("vqa %s %s", name, results["vqa"][name])
        write()
    ct = caption_task(args.dim, *args.cap_scenes, grid=args.grid)
    f1, exact = unbound_oracle(ct.val_scenes)
    results["caption"]["unbound oracle"] = {"content_f1": f1, "exact_set": exact}
    results["caption"]["best constant"] = {"content_f1": constant_caption_f1(ct)}
    for name in args.cap_heads:
        runs = []
        for seed in range(args.cap_seeds):
            t = time.time()
            r = run_caption(
                name, ct, args.cap_steps, args.hidden, 50, seed, args.cap_lr, args.device
            )
            runs.append({**r, "seconds": time.time() - t})
        results["caption"][name] = over_seeds(runs)
        logger.info("caption %s %s", name, results["caption"][name])
        write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
