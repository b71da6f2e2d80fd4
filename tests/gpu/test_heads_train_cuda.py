"""``butd heads train --device cuda`` (skipped without a GPU): a few updates of each task on the
GPU, with SCST for captions; the checkpoints then load and run on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from butd.heads.inference import answer, caption, load_head
from butd.store.h5 import FeatureFile
from tests.heads_data import run_heads_cli, write_heads_dataset

pytestmark = pytest.mark.gpu


def _run(argv: list[str]) -> None:
    assert run_heads_cli(argv) == 0


@pytest.mark.parametrize("head", ["updown", "sat", "adaptive"])
def test_caption_training_on_cuda(tmp_path: Path, head: str) -> None:
    data = write_heads_dataset(tmp_path, dim=32, scenes=12)
    out = tmp_path / "cap"
    _run(["heads", "train", "caption", "--features", str(data["features"]), "--annotations",
          str(data["karpathy"]), "--out", str(out), "--steps", "4", "--batch-size", "8",
          "--min-count", "1", "--hidden", "32", "--head", head, "--scst-steps", "2",
          "--device", "cuda"])  # fmt: skip
    saved = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    assert saved["step"] == 4
    model, meta = load_head(out)
    with FeatureFile(data["features"]) as ff:
        record = ff.get("synth-1-0")
    result = caption(model, meta, record)
    assert result.attention.shape[1] == record.num_boxes


@pytest.mark.parametrize("head", ["updown", "ban"])
def test_vqa_training_on_cuda(tmp_path: Path, head: str) -> None:
    data = write_heads_dataset(tmp_path, dim=32, scenes=12)
    out = tmp_path / "vqa"
    _run(["heads", "train", "vqa", "--features", str(data["features"]), "--annotations",
          str(data["annotations"]), "--questions", str(data["questions"]), "--out", str(out),
          "--steps", "3", "--batch-size", "8", "--min-count", "1", "--head", head,
          "--device", "cuda"])  # fmt: skip
    assert torch.load(out / "last.pt", map_location="cpu", weights_only=False)["step"] == 3
    model, meta = load_head(out)
    with FeatureFile(data["features"]) as ff:
        record = ff.get("synth-1-0")
    result = answer(model, meta, record, "what color is the star?", top=2)
    assert len(result.answers) == 2
