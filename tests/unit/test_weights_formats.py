"""Converters: every canonical tensor checked against the source tensor it must come from.

Full-size checkpoints (ResNet-101, 1600/400) with the published key names are built once per
format (class-scoped fixtures, freed before the next format); ``expected_canonical`` computes
the target independently (explicit row moves, anchor permutation from (size, ratio) pairs).
"""

from __future__ import annotations

import argparse
import math
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from butd.detector.config import ArchConfig, tiny_arch
from butd.detector.weights import (
    WeightsError,
    canonical_shapes,
    convert,
    convert_airsplay,
    convert_hf,
    convert_milvlg,
    detect_format,
    load,
    read_source,
)
from butd.detector.weights.formats import CONVERTERS, DETECTRON2_CONVENTIONS, MILVLG_CONVENTIONS
from tests.unit import synthetic_checkpoints as synth

FULL = ArchConfig()
TINY = tiny_arch()


def _assert_matches_expected(fmt: str, source: Any, arch: ArchConfig) -> dict[str, torch.Tensor]:
    converted = CONVERTERS[fmt](source, arch=arch)
    expected = synth.expected_canonical(fmt, source, arch)
    out = converted.state_dict
    assert out.keys() == canonical_shapes(arch, converted.conventions).keys()
    assert out.keys() == expected.keys()
    mismatched = [k for k in expected if not torch.equal(out[k], expected[k].float())]
    assert mismatched == []
    assert all(t.dtype == torch.float32 for t in out.values())
    return out


def _assert_ratio_major(anchors: torch.Tensor, sizes: tuple[float, ...]) -> None:
    """Row a = ratio_idx * 4 + size_idx, checked from the anchors' own geometry."""
    w = anchors[:, 2] - anchors[:, 0]
    h = anchors[:, 3] - anchors[:, 1]
    for a in range(12):
        ratio, size = synth.RATIOS[a // 4], sizes[a % 4]
        assert float(h[a] / w[a]) == pytest.approx(ratio, rel=1e-5)
        assert float(torch.sqrt(w[a] * h[a])) == pytest.approx(size, rel=1e-5)


# Class-scoped: each full-size checkpoint lives only while its class runs (memory).
@pytest.fixture(scope="class")
def airsplay_source() -> Any:
    return synth.airsplay_checkpoint(FULL, seed=0)


@pytest.fixture(scope="class")
def airsplay_out(airsplay_source: Any) -> dict[str, torch.Tensor]:
    return _assert_matches_expected("airsplay", airsplay_source, FULL)


@pytest.fixture(scope="class")
def hf_source() -> dict[str, torch.Tensor]:
    return synth.hf_state_dict(FULL, seed=1)


@pytest.fixture(scope="class")
def milvlg_source() -> Any:
    return synth.milvlg_checkpoint(FULL, seed=2)


class TestAirsplay:
    @pytest.fixture
    def source(self, airsplay_source: Any) -> Any:
        return airsplay_source

    @pytest.fixture
    def out(self, airsplay_out: Any) -> Any:
        return airsplay_out

    def test_detected(self, source: Any) -> None:
        assert detect_format(source) == "airsplay"

    def test_background_and_no_attribute_move_to_row_zero(self, source: Any, out: Any) -> None:
        src = source["model"]
        cls_w = src["roi_heads.box_predictor.cls_score.weight"]
        assert np.array_equal(out["roi_heads.cls_score.weight"][0].numpy(), cls_w[1600])
        assert np.array_equal(out["roi_heads.cls_score.weight"][1:].numpy(), cls_w[:1600])
        emb = src["roi_heads.box_predictor.cls_embedding.weight"]
        assert np.array_equal(out["roi_heads.attr.embedding.weight"][0].numpy(), emb[1600])
        attr_b = src["roi_heads.box_predictor.attr_score.bias"]
        assert float(out["roi_heads.attr.score.bias"][0]) == float(attr_b[400])
        assert np.array_equal(out["roi_heads.attr.score.bias"][1:].numpy(), attr_b[:400])

    def test_background_box_rows_are_zero(self, source: Any, out: Any) -> None:
        box = out["roi_heads.bbox_pred.weight"]
        assert box.shape == (6404, 2048)
        assert not box[:4].any()
        src = source["model"]["roi_heads.box_predictor.bbox_pred.weight"]
        assert np.array_equal(box[4:8].numpy(), src[0:4])  # class 1 = source class 0

    def test_anchors_are_ratio_major_with_matching_channels(self, source: Any, out: Any) -> None:
        _assert_ratio_major(out["rpn.cell_anchors"], synth.AIRSPLAY_SIZES)
        src = source["model"]["proposal_generator.rpn_head.anchor_deltas.weight"]
        # canonical anchor 1 = (ratio 0.5, size 128) = detectron2 anchor size 1 * 3 + ratio 0
        assert np.array_equal(out["rpn.deltas.weight"][4:8].numpy(), src[12:16])

    def test_conventions(self) -> None:
        conv = convert_airsplay(synth.airsplay_checkpoint(TINY), arch=TINY).conventions
        assert conv == DETECTRON2_CONVENTIONS
        assert conv.bbox_reg_weights == (10.0, 10.0, 5.0, 5.0)
        assert conv.delta_clamp == pytest.approx(math.log(1000 / 16))
        assert (conv.plus_one, conv.rpn_score, conv.attr_score) == (
            False,
            "sigmoid",
            "softmax_without_none",
        )


class TestHF:
    @pytest.fixture
    def source(self, hf_source: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return hf_source

    def test_converts_and_drops_bn_counters(self, source: dict[str, torch.Tensor]) -> None:
        assert detect_format(source) == "hf"
        assert (
            sum(k.endswith("num_batches_tracked") for k in source) == 104
        )  # 1 stem + 33 blocks x 3 + 4 shortcuts
        out = _assert_matches_expected("hf", source, FULL)
        _assert_ratio_major(out["rpn.cell_anchors"], synth.AIRSPLAY_SIZES)

    def test_anchor_order_is_read_from_the_stored_anchors(self) -> None:
        """Stored anchors in another order: channels follow the anchors, output is the same."""
        sd = synth.hf_state_dict(TINY, seed=4)
        reference = convert_hf(sd, arch=TINY).state_dict
        shuffle = torch.randperm(12, generator=torch.Generator().manual_seed(0))
        rpn = "proposal_generator.rpn_head"
        sd = dict(sd)
        sd[synth.CELL_ANCHORS_KEY] = sd[synth.CELL_ANCHORS_KEY][shuffle]
        for p in ("weight", "bias"):
            sd[f"{rpn}.objectness_logits.{p}"] = sd[f"{rpn}.objectness_logits.{p}"][shuffle]
            deltas = sd[f"{rpn}.anchor_deltas.{p}"]
            sd[f"{rpn}.anchor_deltas.{p}"] = deltas.reshape(12, 4, *deltas.shape[1:])[
                shuffle
            ].reshape(deltas.shape)
        shuffled = convert_hf(sd, arch=TINY).state_dict
        for key in ("rpn.cell_anchors", "rpn.objectness.weight", "rpn.deltas.bias"):
            assert torch.equal(shuffled[key], reference[key]), key

    def test_missing_anchors_is_an_error(self) -> None:
        sd = synth.hf_state_dict(TINY)
        del sd[synth.CELL_ANCHORS_KEY]
        with pytest.raises(WeightsError, match="cell_anchors"):
            convert_hf(sd, arch=TINY)

    def test_anchors_that_are_not_a_grid_are_rejected(self) -> None:
        sd = synth.hf_state_dict(TINY)
        anchors = sd[synth.CELL_ANCHORS_KEY].clone()
        anchors[0] = torch.tensor([-10.0, -30.0, 10.0, 30.0])  # a 4th aspect ratio
        sd[synth.CELL_ANCHORS_KEY] = anchors
        with pytest.raises(WeightsError, match="ratio x size grid"):
            convert_hf(sd, arch=TINY)


class TestMILVLG:
    @pytest.fixture
    def source(self, milvlg_source: Any) -> Any:
        return milvlg_source

    def test_converts(self, source: Any) -> None:
        assert detect_format(source) == "milvlg"
        out = _assert_matches_expected("milvlg", source, FULL)
        _assert_ratio_major(out["rpn.cell_anchors"], synth.MILVLG_SIZES)
        src = source["model"]
        obj = src["proposal_generator.rpn_head.objectness_logits.bias"]
        # canonical fg channel 12 + 1 = (ratio 0.5, size 8) = detectron2 fg channel 12 + 3
        assert float(out["rpn.objectness.bias"][13]) == float(obj[15])
        assert float(out["rpn.objectness.bias"][1]) == float(obj[3])  # same anchor, bg block
        box = src["roi_heads.box_predictor.bbox_pred.weight"]
        assert torch.equal(out["roi_heads.bbox_pred.weight"], box)  # Caffe order already

    def test_conventions(self) -> None:
        conv = convert_milvlg(synth.milvlg_checkpoint(TINY), arch=TINY).conventions
        assert conv == MILVLG_CONVENTIONS
        assert (conv.plus_one, conv.nms_suppress_equal, conv.rpn_score) == (True, True, "softmax2")
        assert (conv.rpn_min_size, conv.rpn_min_size_scaled, conv.rpn_min_size_inclusive) == (
            16.0,
            True,
            False,
        )
        assert conv.attr_score == "softmax_all"


@pytest.mark.parametrize(
    ("fmt", "build", "bn_key"),
    [
        ("airsplay", synth.airsplay_checkpoint, "backbone.res3.0.conv2.norm.bias"),
        ("hf", synth.hf_state_dict, "backbone.res3.0.conv2.norm.bias"),
        ("milvlg", synth.milvlg_checkpoint, "backbone.res3.0.conv2.norm.bias"),
    ],
)
def test_missing_extra_and_misshapen_keys_are_all_named(fmt: str, build: Any, bn_key: str) -> None:
    source = build(TINY)
    sd = source.get("model", source)
    del sd[bn_key]
    sd["roi_heads.box_predictor.mystery.weight"] = np.zeros((2, 2), np.float32)
    sd["proposal_generator.rpn_head.conv.bias"] = np.zeros(7, np.float32)
    with pytest.raises(WeightsError) as info:
        CONVERTERS[fmt](source, arch=TINY)
    message = str(info.value)
    assert bn_key in message
    assert "roi_heads.box_predictor.mystery.weight" in message
    assert "proposal_generator.rpn_head.conv.bias is [7], expected [32]" in message
    assert info.value.missing == (bn_key,)


def test_full_size_checkpoint_against_the_tiny_arch_fails_loudly() -> None:
    with pytest.raises(WeightsError, match="wrong shapes"):
        convert_milvlg(synth.milvlg_checkpoint(TINY), arch=ArchConfig(num_classes=9))


def _write(tmp_path: Path, fmt: str) -> Path:
    if fmt == "airsplay":
        path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
        path.write_bytes(pickle.dumps(synth.airsplay_checkpoint(TINY), protocol=2))
    elif fmt == "hf":
        path = tmp_path / "pytorch_model.bin"
        torch.save(synth.hf_state_dict(TINY), path)
    else:
        path = tmp_path / "bua-caffe-frcn-r101-k36.pth"
        torch.save(synth.milvlg_checkpoint(TINY), path)
    return path


@pytest.mark.parametrize("fmt", ["airsplay", "hf", "milvlg"])
def test_files_are_detected_converted_and_loadable(tmp_path: Path, fmt: str) -> None:
    src = _write(tmp_path, fmt)
    assert detect_format(src) == fmt
    out = convert(src, tmp_path / "w.safetensors", arch=TINY)
    assert detect_format(out) == "canonical"
    loaded = load(out)
    assert loaded.source_format == fmt
    assert loaded.spec.arch == TINY
    assert len(loaded.spec.objects_vocab) == TINY.num_classes
    expected = CONVERTERS[fmt](read_source(src), arch=TINY).state_dict
    assert all(torch.equal(loaded.state_dict[k], v) for k, v in expected.items())


def test_caffemodel_without_layers_names_the_missing_blobs(tmp_path: Path) -> None:
    path = tmp_path / "resnet101_faster_rcnn_final.caffemodel"
    path.write_bytes(b"\x0a\x03abc")  # NetParameter with only a name
    assert detect_format(path) == "caffe"
    with pytest.raises(WeightsError, match=r"conv1\[0\] -> backbone.stem.conv.weight"):
        convert(path, tmp_path / "out.safetensors")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_pickles_with_code_are_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (print, ("pwned",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"model": {"x": Evil()}}))
    with pytest.raises(WeightsError, match="trust_pickle"):
        read_source(path)


def test_unrecognised_checkpoint() -> None:
    with pytest.raises(WeightsError, match="unrecognised"):
        detect_format({"model": {"fc.weight": torch.zeros(2)}})


@pytest.mark.slow
def test_full_size_airsplay_file_through_the_cli(tmp_path: Path) -> None:
    from butd.cli import weights as cli
    from butd.cli.main import build_parser

    src = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    with src.open("wb") as f:
        pickle.dump(synth.airsplay_checkpoint(FULL, seed=5), f, protocol=4)
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "weights" not in sub.choices:
        cli.register(sub)
    args = parser.parse_args(["weights", "convert", str(src), "--out", str(tmp_path / "w.st")])
    assert args.handler(args) == 0
    loaded = load(tmp_path / "w.st")
    assert loaded.spec.objects_vocab[:3] == ("yolk", "goal", "bathroom")
    assert loaded.spec.attributes_vocab[0] == "gray"
    assert loaded.spec.conventions == DETECTRON2_CONVENTIONS
