"""A tiny caption / VQA dataset on simulated region features, in the formats users bring.

Writes a ragged feature file (``butd.store.h5`` layout), a Karpathy-split caption file and VQA v2
questions / annotations for ``n`` simulated scenes (``butd.heads.synth``), for the tests of the
heads command line and of the HTTP heads endpoints, and runs that command line in-process.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from butd.heads.synth import GRID, SynthWorld, make_questions, make_scenes, scene_captions
from butd.store.h5_writer import write_feature_file


def write_heads_dataset(
    root: Path, *, dim: int, scenes: int, grid: bool = False
) -> dict[str, Path]:
    """Files under ``root``: keys features, karpathy, questions, annotations (and root);
    ``grid`` renders the scenes as grid maps, stored as the file's ``grids`` too."""
    made = make_scenes(SynthWorld(dim, seed=0), scenes, seed=1, max_objects=3, grid=grid)
    write_feature_file(
        root / "f.h5",
        [s.record for s in made],
        model_version="synthetic",
        feature_dim=dim,
        grid_size=GRID if grid else 0,
    )
    rng = random.Random(0)
    images = [
        {"split": "train", "cocoid": s.record.image_id,
         "sentences": [{"raw": c, "tokens": c.split()} for c in scene_captions(s, rng)]}
        for s in made
    ]  # fmt: skip
    (root / "karpathy.json").write_text(json.dumps({"images": images}))
    qs = make_questions(made, seed=2)
    questions = [{"question_id": i, "image_id": made[q.scene].record.image_id, "question": q.text}
                 for i, q in enumerate(qs)]  # fmt: skip
    anns = [{"question_id": i, "image_id": made[q.scene].record.image_id, "answer_type": q.qtype,
             "question_type": q.qtype, "multiple_choice_answer": q.answer,
             "answers": [{"answer": a, "answer_id": j + 1} for j, a in enumerate(q.human_answers)]}
            for i, q in enumerate(qs)]  # fmt: skip
    (root / "q.json").write_text(json.dumps({"questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": anns}))
    return {"root": root, "features": root / "f.h5", "karpathy": root / "karpathy.json",
            "questions": root / "q.json", "annotations": root / "a.json"}  # fmt: skip


def run_heads_cli(argv: list[str]) -> int:
    """Run ``butd`` heads commands (``heads train``, ``caption``, ``answer``) in this process;
    their exit status."""
    from butd.cli import heads as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    status: int = args.handler(args)
    return status
