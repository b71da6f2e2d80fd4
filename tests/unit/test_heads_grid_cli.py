"""Grid heads through the heads command line: ``butd heads train caption --head sca --grid
--cbam``, ``butd caption``, and the VQA head with CBAM over grids, on a simulated grid file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from butd.heads.inference import caption, load_head
from butd.heads.regions import grid_as_regions
from butd.heads.synth import GRID, SynthWorld, grid_scene
from tests.heads_data import run_heads_cli, write_heads_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_heads_dataset(tmp_path_factory.mktemp("gridheads"), dim=32, scenes=10, grid=True)


def _train(task: str, data: dict[str, Path], out: Path, *extra: str) -> None:
    argv = [
        "heads",
        "train",
        task,
        "--features",
        str(data["features"]),
        "--annotations",
        str(data["karpathy"] if task == "caption" else data["annotations"]),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--min-count",
        "1",
        "--hidden",
        "16",
        *extra,
    ]
    if task == "vqa":
        argv += ["--questions", str(data["questions"])]
    assert run_heads_cli(argv) == 0  # fmt: skip


def test_sca_and_cbam_heads_train_caption_and_answer_over_grids(
    dataset: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = dataset["root"]
    _train("caption", dataset, root / "sca", "--head", "sca", "--grid", "--cbam")
    _train("vqa", dataset, root / "vqa", "--grid", "--cbam")
    model, meta = load_head(root / "sca")
    assert meta["head"] == "sca" and meta["config"]["grid_size"] == GRID
    assert meta["config"]["cbam"] is True
    capsys.readouterr()
    args = ["--features", str(dataset["features"])]
    assert run_heads_cli(["caption", "synth-1-0", "--model", str(root / "sca"), *args]) == 0
    assert isinstance(json.loads(capsys.readouterr().out)["caption"], str)
    argv = ["answer", "synth-1-0", "what color is the star?", "--model", str(root / "vqa"), *args]
    assert run_heads_cli(argv) == 0
    assert len(json.loads(capsys.readouterr().out)["answers"]) == 5
    scene = grid_scene(SynthWorld(32, seed=0), "x", np.random.default_rng(0))
    plain = dataclasses.replace(scene.record, grid=None)
    with pytest.raises(ValueError, match="grid_size=4"):
        caption(model, meta, plain)  # type: ignore[arg-type]


def test_grid_flags_are_checked(dataset: dict[str, Path], tmp_path: Path) -> None:
    regions_only = write_heads_dataset(tmp_path, dim=32, scenes=4)
    with pytest.raises(SystemExit, match="grid-size"):
        _train("caption", regions_only, tmp_path / "x", "--grid")
    with pytest.raises(SystemExit, match="--grid"):
        _train("caption", dataset, tmp_path / "y", "--cbam")
    with pytest.raises(SystemExit, match="updown and sca"):
        _train("caption", dataset, tmp_path / "z", "--head", "sat", "--grid", "--cbam")


def test_grid_as_regions_keeps_row_major_cells_and_boxes() -> None:
    scene = grid_scene(SynthWorld(8, seed=0), "x", np.random.default_rng(1))
    rec = grid_as_regions(scene.record, GRID)
    assert rec.grid is not None
    np.testing.assert_array_equal(rec.features[1 * GRID + 2], rec.grid[1, 2])
    w, h = rec.image_w / GRID, rec.image_h / GRID
    np.testing.assert_allclose(rec.boxes[1 * GRID + 2], [2 * w, 1 * h, 3 * w, 2 * h])
    with pytest.raises(ValueError, match="trained on 7x7"):
        grid_as_regions(scene.record, 7)
