"""The packaged demo heads: a caption head and a VQA head trained by ``butd heads train`` on
the demo detector's features of ``butd synth`` scenes (README.md here says how).

Torch-free, so worker settings and the CLI can name the files without importing a model.
"""

from __future__ import annotations

from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent
DEMO_DETECTOR = "demo-synthetic"
"""Registry name of the detector whose features the demo heads were trained on."""
DEMO_NOTE = (
    "synthetic demo: trained on butd synth scenes of coloured shapes with the demo detector, "
    "not on COCO / VQA"
)
"""Recorded in each demo head's checkpoint (``--note``) and returned with every answer."""


def demo_head(task: str) -> Path:
    """Checkpoint directory of the packaged ``task`` head ("caption" or "vqa")."""
    if task not in ("caption", "vqa"):
        raise ValueError(f"no demo head for task {task!r}; choose caption or vqa")
    return DEMO_DIR / task
