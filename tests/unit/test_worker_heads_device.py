"""A worker's heads run on its extraction device: build_worker -> start_heads -> load_head.

No Redis and no model: the extractor, the heads server and the Worker are stand-ins that
record what they were given. The ``meta`` device shows where the heads' weights went without
a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

import butd.workers.heads_task as heads_task
import butd.workers.worker as worker_mod
from butd.workers.settings import WorkerSettings
from tests.head_checkpoints import write_head


class _Recorder:
    """Stands in for a class: keeps its constructor's arguments, ``start`` does nothing."""

    made: ClassVar[list[_Recorder]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs
        _Recorder.made.append(self)

    def start(self) -> None:
        pass


@pytest.fixture
def recorder() -> type[_Recorder]:
    _Recorder.made = []
    return _Recorder


def _settings(tmp_path: Path, **kw: Any) -> WorkerSettings:
    return WorkerSettings(
        redis_url="redis://127.0.0.1:1/0", store_dir=tmp_path / "store", worker_id="w", **kw
    )


def test_start_heads_loads_the_heads_onto_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: type[_Recorder]
) -> None:
    monkeypatch.setattr(heads_task, "HeadsServer", recorder)
    cap = write_head(tmp_path / "cap", "caption", "updown")
    vqa = write_head(tmp_path / "vqa", "vqa", "updown")
    server = heads_task.start_heads(
        _settings(tmp_path, caption_model=cap, vqa_model=vqa), device="meta"
    )
    assert server is recorder.made[0]
    heads = recorder.made[0].args[2]
    assert sorted(heads) == ["caption", "vqa"]
    for head in heads.values():
        assert {p.device.type for p in head.model.parameters()} == {"meta"}
    assert heads_task.start_heads(_settings(tmp_path, demo_heads=False), device="meta") is None


def test_demo_detector_defaults_to_the_packaged_demo_heads(tmp_path: Path) -> None:
    from butd.heads.demo import demo_head

    settings = _settings(tmp_path)  # WEIGHTS=demo-synthetic, CAPTION_MODEL / VQA_MODEL unset
    assert (settings.caption_model, settings.vqa_model) == (demo_head("caption"), demo_head("vqa"))
    named = _settings(tmp_path, caption_model=tmp_path / "mine")
    assert named.caption_model == tmp_path / "mine" and named.vqa_model == demo_head("vqa")
    other = _settings(tmp_path, weights="caffe-10-100")
    assert (other.caption_model, other.vqa_model) == (None, None)
    off = _settings(tmp_path, demo_heads=False)
    assert (off.caption_model, off.vqa_model) == (None, None)


def test_build_worker_starts_the_heads_on_the_extractors_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, recorder: type[_Recorder]
) -> None:
    import butd.detector.extractor as extractor_module

    extractor_devices: list[str] = []
    spec = SimpleNamespace(
        objects_vocab=["cat"],
        attributes_vocab=["red"],
        arch=SimpleNamespace(feature_dim=8),
        description="fake",
    )

    def from_weights(weights: str, *, device: str, **kw: Any) -> SimpleNamespace:
        extractor_devices.append(device)
        return SimpleNamespace(model_version="v1", spec=spec)

    heads_devices: list[str] = []

    def start_heads(settings: WorkerSettings, device: str = "cpu") -> None:
        heads_devices.append(device)

    fake_cls = SimpleNamespace(from_weights=from_weights)
    monkeypatch.setattr(extractor_module, "Extractor", fake_cls)
    monkeypatch.setattr(worker_mod, "start_heads", start_heads)
    monkeypatch.setattr(worker_mod, "Worker", recorder)
    worker_mod.build_worker(_settings(tmp_path, device="cuda:3"))
    assert extractor_devices == heads_devices == ["cuda:3"]
    assert recorder.made[0].kwargs["device"] == "cuda:3"
