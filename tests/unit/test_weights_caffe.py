"""The original Caffe model: protobuf reading and the blob -> canonical mapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from butd.detector.config import ArchConfig, Conventions, tiny_arch
from butd.detector.weights import (
    WeightsError,
    canonical_shapes,
    convert,
    convert_caffe,
    detect_format,
    load,
    read_caffemodel,
)
from butd.detector.weights.formats_caffe import caffe_block
from tests.unit import synthetic_checkpoints as synth

TINY = tiny_arch()


def _bn_stat(blobs: list[np.ndarray], index: int) -> torch.Tensor:
    """Caffe BatchNorm: the stored sum times 1/factor (float32 scale, as caffe_cpu_scale)."""
    factor = np.float32(blobs[2][0])
    scale = np.float32(0) if factor == 0 else np.float32(1) / factor
    return torch.from_numpy(blobs[index] * scale)


def _expected(layers: dict[str, list[np.ndarray]], arch: ArchConfig) -> dict[str, torch.Tensor]:
    """Canonical tensors from Caffe blobs, by the prototxt naming (independent of the code)."""
    out: dict[str, torch.Tensor] = {}

    def conv_bn(canon_conv: str, canon_bn: str, conv: str, bn: str, scale: str) -> None:
        out[canon_conv] = torch.from_numpy(layers[conv][0])
        out[f"{canon_bn}.running_mean"] = _bn_stat(layers[bn], 0)
        out[f"{canon_bn}.running_var"] = _bn_stat(layers[bn], 1)
        out[f"{canon_bn}.weight"] = torch.from_numpy(layers[scale][0])
        out[f"{canon_bn}.bias"] = torch.from_numpy(layers[scale][1])

    conv_bn("backbone.stem.conv.weight", "backbone.stem.bn", "conv1", "bn_conv1", "scale_conv1")
    for block, i, b in synth.caffe_block_ids(arch):
        prefix = f"roi_heads.res5.{b}" if i == 3 else f"backbone.res{i + 2}.{b}"
        branches = [("2a", "conv1", "bn1"), ("2b", "conv2", "bn2"), ("2c", "conv3", "bn3")]
        if b == 0:
            branches.append(("1", "shortcut", "shortcut_bn"))
        for branch, conv, bn in branches:
            names = (f"res{block}_branch{branch}", f"bn{block}_branch{branch}")
            conv_bn(f"{prefix}.{conv}.weight", f"{prefix}.{bn}", *names,
                    f"scale{block}_branch{branch}")  # fmt: skip
    heads = {
        "rpn.conv": "rpn_conv/3x3", "rpn.objectness": "rpn_cls_score",
        "rpn.deltas": "rpn_bbox_pred", "roi_heads.cls_score": "cls_score",
        "roi_heads.bbox_pred": "bbox_pred", "roi_heads.attr.fc": "fc_attr",
        "roi_heads.attr.score": "attr_score",
    }  # fmt: skip
    for canon, layer in heads.items():
        out[f"{canon}.weight"] = torch.from_numpy(layers[layer][0])
        out[f"{canon}.bias"] = torch.from_numpy(layers[layer][1])
    out["roi_heads.attr.embedding.weight"] = torch.from_numpy(layers["cls_embedding"][0])
    return out


def test_block_names_follow_the_prototxt() -> None:
    assert [caffe_block(4, i, 23) for i in (0, 1, 22)] == ["4a", "4b1", "4b22"]
    assert [caffe_block(3, i, 4) for i in (0, 3)] == ["3a", "3b3"]
    assert [caffe_block(5, i, 3) for i in (0, 1, 2)] == ["5a", "5b", "5c"]


@pytest.fixture(scope="module")
def full_layers() -> dict[str, list[np.ndarray]]:
    return synth.caffe_layers(ArchConfig(), seed=3)


def test_full_size_model_maps_every_blob(full_layers: dict[str, list[np.ndarray]]) -> None:
    assert len(full_layers) == 1 + 3 * (104 - 1) + 2 + 8  # conv1 triple + blocks + heads
    converted = convert_caffe(full_layers)
    assert converted.conventions == Conventions()
    out = converted.state_dict
    assert out.keys() == canonical_shapes(ArchConfig()).keys()
    expected = _expected(full_layers, ArchConfig())
    assert [k for k, v in expected.items() if not torch.equal(out[k], v)] == []
    bn = full_layers["bn4b22_branch2b"]
    np.testing.assert_allclose(
        out["backbone.res4.22.bn2.running_var"].numpy(), bn[1] / bn[2][0], rtol=1e-6
    )
    assert out["rpn.cell_anchors"][0].tolist() == [-38.0, -16.0, 53.0, 31.0]  # Caffe table


def test_zero_factor_gives_zero_statistics() -> None:
    layers = synth.caffe_layers(TINY)
    layers["bn_conv1"][2] = np.zeros(1, np.float32)
    out = convert_caffe(layers, arch=TINY).state_dict
    assert not out["backbone.stem.bn.running_var"].any()


def test_missing_extra_and_misshapen_blobs_are_all_named() -> None:
    layers = synth.caffe_layers(TINY)
    del layers["scale3a_branch2b"]
    layers["rel_score"] = [np.zeros((3, 2), np.float32)]
    layers["fc_attr"][1] = np.zeros(5, np.float32)
    with pytest.raises(WeightsError) as info:
        convert_caffe(layers, arch=TINY)
    message = str(info.value)
    assert "scale3a_branch2b[0] -> backbone.res3.0.bn2.weight" in message
    assert "scale3a_branch2b[1] -> backbone.res3.0.bn2.bias" in message
    assert "layer rel_score" in message
    assert "fc_attr[1] -> roi_heads.attr.fc.bias is [5], expected [32]" in message


def test_caffemodel_file_round_trip(tmp_path: Path) -> None:
    layers = synth.caffe_layers(TINY, seed=7)
    v1 = frozenset({"conv1", "fc_attr", "bn_conv1"})  # old-style layers with 4-D legacy blobs
    path = tmp_path / "resnet101_faster_rcnn_final.caffemodel"
    path.write_bytes(synth.encode_caffemodel(layers, v1=v1))
    read = read_caffemodel(path)
    assert read.keys() == layers.keys()  # the blob-less ReLU layer is skipped
    assert all(
        np.array_equal(np.squeeze(x), np.squeeze(y))
        for n in layers
        for x, y in zip(read[n], layers[n], strict=True)
    )
    assert detect_format(path) == "caffe"
    out = convert(path, tmp_path / "caffe.safetensors", arch=TINY)
    loaded = load(out)
    assert loaded.source_format == "caffe"
    assert loaded.spec.conventions == Conventions()
    expected = _expected(layers, TINY)
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())


def test_truncated_caffemodel_is_an_error(tmp_path: Path) -> None:
    data = synth.encode_caffemodel(synth.caffe_layers(TINY))
    path = tmp_path / "cut.caffemodel"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        convert(path, tmp_path / "x.safetensors", arch=TINY)
