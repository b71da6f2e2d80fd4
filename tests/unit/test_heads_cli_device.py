"""``butd caption`` / ``butd answer --device``: the option reaches
``butd.heads.inference.load_head``.

A spy stands in for ``load_head``: it records the device it was asked for, then loads the
checkpoint on the CPU (no GPU needed), so the command still prints a real caption / answers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import butd.heads.inference as inference
from butd.store.h5_writer import write_feature_file
from tests.head_checkpoints import DIM, scene_record, write_head
from tests.heads_data import run_heads_cli

torch.set_num_threads(1)


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Devices ``load_head`` was called with, in order."""
    real = inference.load_head
    devices: list[Any] = []

    def load_head(path: str | Path, device: Any = "cpu") -> Any:
        devices.append(device)
        return real(path, device="cpu")

    monkeypatch.setattr(inference, "load_head", load_head)
    return devices


def _local_args(tmp_path: Path, task: str) -> list[str]:
    record = scene_record()
    features = tmp_path / "f.h5"
    write_feature_file(features, [record], model_version="synthetic", feature_dim=DIM)
    head = write_head(tmp_path / task, task, "updown")
    local = ["--model", str(head), "--features", str(features)]
    if task == "caption":
        return ["caption", record.image_id, *local, "--beam", "2"]
    return ["answer", record.image_id, "what color is the circle?", *local, "--top", "2"]


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_device_option_reaches_load_head(
    tmp_path: Path, task: str, spy: list[Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_heads_cli([*_local_args(tmp_path, task), "--device", "cuda:1"]) == 0
    assert spy == ["cuda:1"]
    out = json.loads(capsys.readouterr().out)
    assert "caption" in out if task == "caption" else len(out["answers"]) == 2


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_device_defaults_to_cpu_like_extract(tmp_path: Path, task: str, spy: list[Any]) -> None:
    assert run_heads_cli(_local_args(tmp_path, task)) == 0
    assert spy == ["cpu"]
