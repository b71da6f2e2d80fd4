"""Canonical weight files: the key/shape table, save/load round trip, error reporting."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from butd.detector.config import ArchConfig, Conventions, ModelSpec, tiny_arch
from butd.detector.weights import (
    WeightsError,
    canonical_shapes,
    file_sha256,
    is_canonical_file,
    load,
    save_canonical,
)
from tests.unit.synthetic_checkpoints import caffe_cell_anchors, random_canonical_state_dict

SIGMOID = Conventions(rpn_score="sigmoid")


def _resnet101_params() -> int:
    """Parameters + BN buffers of the published network, counted from the paper's layout."""
    total = 64 * 3 * 49 + 4 * 64  # stem conv + BN
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 23, 3), strict=True):
        out = 4 * width
        for b in range(blocks):
            block_in = cin if b == 0 else out
            total += width * block_in + width * width * 9 + out * width  # 3 convs
            total += 4 * (width + width + out)  # 3 BNs
            if b == 0:
                total += out * block_in + 4 * out  # projection + BN
        cin = out
    rpn = 512 * 1024 * 9 + 512 + 24 * 512 + 24 + 48 * 512 + 48 + 12 * 4
    heads = 1601 * 2048 + 1601 + 6404 * 2048 + 6404 + 1601 * 256 + 512 * 2304 + 512
    return total + rpn + heads + 401 * 512 + 401


def test_full_arch_table_counts_every_published_tensor() -> None:
    shapes = canonical_shapes(ArchConfig())
    assert sum(math.prod(s) for s in shapes.values()) == _resnet101_params()
    assert shapes["backbone.res4.22.conv2.weight"] == (256, 256, 3, 3)
    assert shapes["backbone.res3.0.shortcut.weight"] == (512, 256, 1, 1)
    assert shapes["roi_heads.res5.0.shortcut_bn.running_var"] == (2048,)
    assert "roi_heads.res5.1.shortcut.weight" not in shapes
    assert shapes["roi_heads.bbox_pred.weight"] == (6404, 2048)
    assert shapes["roi_heads.attr.fc.weight"] == (512, 2304)
    assert shapes["rpn.cell_anchors"] == (12, 4)
    assert not any("num_batches_tracked" in k for k in shapes)


def test_objectness_channels_follow_the_rpn_score_layout() -> None:
    assert canonical_shapes(ArchConfig())["rpn.objectness.weight"] == (24, 512, 1, 1)
    assert canonical_shapes(ArchConfig(), SIGMOID)["rpn.objectness.bias"] == (12,)


@pytest.mark.parametrize("conventions", [Conventions(), SIGMOID])
def test_table_is_the_model_state_dict(conventions: Conventions) -> None:
    detector_module = pytest.importorskip("butd.detector.model.detector")
    spec = ModelSpec(arch=tiny_arch(), conventions=conventions)
    model = detector_module.Detector(spec)
    actual = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert actual == canonical_shapes(spec.arch, conventions)
    model.load_state_dict(random_canonical_state_dict(spec.arch, 3, conventions), strict=True)


def _tiny_spec() -> ModelSpec:
    arch = tiny_arch()
    return ModelSpec(
        arch=arch,
        conventions=SIGMOID,
        objects_vocab=tuple(f"o{i}" for i in range(arch.num_classes)),
        attributes_vocab=tuple(f"a{i}" for i in range(arch.num_attributes)),
        description="tiny test",
    )


def test_round_trip_keeps_tensors_spec_and_hashes(tmp_path: Path) -> None:
    spec = _tiny_spec()
    sd = random_canonical_state_dict(spec.arch, 0, spec.conventions)
    path = save_canonical(
        tmp_path / "w.safetensors", sd, spec, source_sha256="ab" * 32, source_format="hf"
    )
    loaded = load(path)
    assert loaded.spec == spec
    assert loaded.sha256 == file_sha256(path)
    assert (loaded.source_format, loaded.source_sha256) == ("hf", "ab" * 32)
    assert loaded.state_dict.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(loaded.state_dict[key], value), key
    assert is_canonical_file(path)
    assert not (tmp_path / "w.safetensors.tmp").exists()


def test_random_state_dict_uses_caffe_anchors() -> None:
    sd = random_canonical_state_dict(tiny_arch(), 0)
    assert sd["rpn.cell_anchors"][0].tolist() == [-38.0, -16.0, 53.0, 31.0]
    assert sd["rpn.cell_anchors"][11].tolist() == [-168.0, -344.0, 183.0, 359.0]
    assert torch.equal(sd["rpn.cell_anchors"], caffe_cell_anchors())


def test_save_rejects_a_state_dict_that_does_not_fit(tmp_path: Path) -> None:
    spec = _tiny_spec()
    sd = random_canonical_state_dict(spec.arch, 0, spec.conventions)
    del sd["rpn.deltas.bias"]
    with pytest.raises(WeightsError, match=r"rpn\.deltas\.bias"):
        save_canonical(tmp_path / "x.safetensors", sd, spec, source_sha256=None, source_format="t")
    assert not (tmp_path / "x.safetensors").exists()


def test_load_names_every_missing_unexpected_and_misshapen_key(tmp_path: Path) -> None:
    spec = _tiny_spec()
    sd = random_canonical_state_dict(spec.arch, 0, spec.conventions)
    del sd["backbone.res3.0.bn2.running_mean"]
    del sd["roi_heads.attr.fc.bias"]
    sd["rpn.extra"] = torch.zeros(3)
    sd["roi_heads.cls_score.weight"] = torch.zeros(5, 64)
    meta = {"butd_format": "1", "spec": json.dumps(spec.to_json()), "source_sha256": "",
            "source_format": "t"}  # fmt: skip
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(WeightsError) as info:
        load(path)
    err = info.value
    assert set(err.missing) == {"backbone.res3.0.bn2.running_mean", "roi_heads.attr.fc.bias"}
    assert err.unexpected == ("rpn.extra",)
    assert err.wrong_shapes == {"roi_heads.cls_score.weight": ((5, 64), (9, 256))}
    for name in ("bn2.running_mean", "attr.fc.bias", "rpn.extra", "cls_score.weight"):
        assert name in str(err)


def test_load_checks_against_the_full_arch_too(tmp_path: Path) -> None:
    spec = _tiny_spec()
    sd = random_canonical_state_dict(spec.arch, 0, spec.conventions)
    full = ModelSpec(arch=ArchConfig(), conventions=SIGMOID)
    meta = {"butd_format": "1", "spec": json.dumps(full.to_json())}
    save_file(sd, str(tmp_path / "lie.safetensors"), metadata=meta)
    with pytest.raises(WeightsError, match="wrong shapes") as info:
        load(tmp_path / "lie.safetensors")
    assert "backbone.res4.22.conv1.weight" in info.value.missing


def test_plain_safetensors_is_not_canonical(tmp_path: Path) -> None:
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    assert not is_canonical_file(tmp_path / "plain.safetensors")
    assert not is_canonical_file(tmp_path / "junk.safetensors")
    with pytest.raises(WeightsError, match="butd weights convert"):
        load(tmp_path / "plain.safetensors")


def test_files_are_byte_deterministic(tmp_path: Path) -> None:
    """Same tensors and spec -> same sha256 (it keys model_version), whatever the dict order."""
    spec = _tiny_spec()
    sd = random_canonical_state_dict(spec.arch, 0, spec.conventions)
    backwards = dict(reversed(list(sd.items())))
    digests = {
        file_sha256(
            save_canonical(tmp_path / f"{i}.safetensors", d, spec, source_sha256="x",
                           source_format="t")
        )
        for i, d in enumerate((sd, backwards, sd))
    }  # fmt: skip
    assert len(digests) == 1
