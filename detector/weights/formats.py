"""Converters from every published BUTD checkpoint format to the canonical layout.

Formats (reference §2.5, §3.3, §4.1, §9.2):

* ``airsplay``: ``faster_rcnn_from_caffe_attr{,_original}.pkl``, a detectron2 pickle
  ``{"model": {name: np.ndarray}, "__author__": ...}``; background class and "no attribute"
  LAST, ``bbox_pred`` without a background row, one sigmoid logit per anchor, detectron2
  anchors (sizes 64..512, size-major).
* ``hf``: ``unc-nlp/frcnn-vg-finetuned/pytorch_model.bin``, a flat ``torch.save``'d state dict
  with the airsplay names plus ``proposal_generator.anchor_generator.cell_anchors.0`` and
  ``num_batches_tracked`` on every BatchNorm.
* ``milvlg``: ``bua-caffe-frcn-r101*.pth``, a detectron2 checkpoint ``{"model": {name:
  tensor}}``; Caffe class order (background 0), 6404-row ``bbox_pred``, 2A objectness
  channels (``view(2, A)``: background block, foreground block), detectron2 anchors with
  sizes 4..32 (size-major); res4/res5 BatchNorms carry ``num_batches_tracked``.
* ``caffe``: the original ``.caffemodel`` (``formats_caffe.py``): Caffe conventions and
  anchors, every tensor already in canonical order.

BatchNorm statistics are copied verbatim and used with eps 1e-5. detectron2's
``FrozenBatchNorm2d`` subtracts eps from ``running_var`` only for checkpoints whose module
metadata says version < 3 (stats saved by an old FrozenBN that added no eps); none of these
files carries that metadata (pickled numpy arrays, or torch modules that use eps), so the
correction would be wrong here. ``num_batches_tracked`` is dropped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from butd.detector.anchors import detectron2_cell_anchors
from butd.detector.config import DETECTRON2_DELTA_CLAMP, ArchConfig, Conventions, ModelSpec
from butd.detector.weights import formats_d2 as d2
from butd.detector.weights.canonical import (
    WeightsError,
    canonical_shapes,
    check_shapes,
    file_sha256,
    save_canonical,
)
from butd.detector.weights.formats_caffe import (
    CAFFE_CONVENTIONS,
    CaffeLayers,
    caffe_state_dict,
    read_caffemodel,
)
from butd.detector.weights.formats_read import detect_format, read_source, source_state_dict

logger = logging.getLogger(__name__)

CONVERTIBLE_FORMATS = ("airsplay", "hf", "milvlg", "caffe")

# airsplay and HF run detectron2's test path (reference §2.3, §4.1).
DETECTRON2_CONVENTIONS = Conventions(
    plus_one=False,
    nms_suppress_equal=False,
    delta_clamp=DETECTRON2_DELTA_CLAMP,
    rpn_score="sigmoid",
    rpn_min_size=0.0,
    rpn_min_size_scaled=False,
    rpn_min_size_inclusive=False,  # detectron2 nonempty(): keeps w > 0 and h > 0
    rpn_topk_before_clip=True,
    bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
    attr_score="softmax_without_none",
)
# MILVLG "caffe mode" (reference §3.2): +1 boxes, Caffe NMS, 2-way softmax, detectron2 clamp.
MILVLG_CONVENTIONS = Conventions(
    plus_one=True,
    nms_suppress_equal=True,
    delta_clamp=DETECTRON2_DELTA_CLAMP,
    rpn_score="softmax2",
    rpn_min_size=16.0,
    rpn_min_size_scaled=True,
    rpn_min_size_inclusive=False,
    rpn_topk_before_clip=False,
    bbox_reg_weights=(1.0, 1.0, 1.0, 1.0),
    attr_score="softmax_all",
)
AIRSPLAY_ANCHOR_SIZES = (64.0, 128.0, 256.0, 512.0)
MILVLG_ANCHOR_SIZES = (4.0, 8.0, 16.0, 32.0)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)


@dataclass(frozen=True)
class Converted:
    """A checkpoint in canonical layout, before it gets a spec and a file.

    Attributes:
        state_dict: canonical key -> float32 tensor, exactly ``canonical_shapes(arch, conv)``.
        conventions: the numerical conventions the weights run under.
        source_format: "airsplay", "hf" or "milvlg".
    """

    state_dict: dict[str, torch.Tensor]
    conventions: Conventions
    source_format: str


# ---------------------------------------------------------------------------------------------
# Converters


def _split_extras(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
    """Drop ``num_batches_tracked``; take out the stored cell anchors (or None)."""
    anchors = sd.get(d2.D2_CELL_ANCHORS_KEY)
    kept = {
        k: v
        for k, v in sd.items()
        if not k.endswith(".num_batches_tracked") and k != d2.D2_CELL_ANCHORS_KEY
    }
    return kept, anchors


def _rename(
    sd: dict[str, torch.Tensor],
    arch: ArchConfig,
    conventions: Conventions,
    attr_modules: Mapping[str, str],
    source_shapes: Mapping[str, tuple[int, ...]],
    what: str,
) -> dict[str, torch.Tensor]:
    """Check the source keys/shapes (all problems at once), then rename to canonical keys.

    Args:
        source_shapes: canonical key -> source shape, for keys whose shape differs.
    """
    expected = canonical_shapes(arch, conventions)
    expected.pop("rpn.cell_anchors")
    names = {k: d2.d2_name(k, attr_modules) for k in expected}
    src_expected = {names[k]: tuple(source_shapes.get(k, shape)) for k, shape in expected.items()}
    check_shapes({k: tuple(v.shape) for k, v in sd.items()}, src_expected, what)
    return {k: sd[names[k]].to(torch.float32) for k in expected}


def _anchors(stored: Any, sizes: tuple[float, ...], arch: ArchConfig) -> torch.Tensor:
    """Source-order cell anchors: the stored ones, else detectron2's from ``sizes``."""
    if stored is None:
        anchors = detectron2_cell_anchors(sizes, ANCHOR_RATIOS)
    else:
        anchors = torch.as_tensor(np.asarray(stored), dtype=torch.float32).reshape(-1, 4)
    if anchors.shape[0] != arch.num_anchors:
        raise WeightsError(
            f"{anchors.shape[0]} cell anchors, but the RPN has {arch.num_anchors} per cell"
        )
    return anchors


def _reorder_rpn(
    out: dict[str, torch.Tensor], anchors: torch.Tensor, two_way: bool
) -> dict[str, torch.Tensor]:
    """Permute objectness, deltas and anchors from the source anchor order to ratio-major."""
    perm = d2.ratio_major_order(anchors)
    for p in ("weight", "bias"):
        key = f"rpn.objectness.{p}"
        if two_way:
            out[key] = d2.permute_two_way_objectness(out[key], perm)
        else:
            out[key] = d2.permute_anchor_channels(out[key], perm, 1)
        out[f"rpn.deltas.{p}"] = d2.permute_anchor_channels(out[f"rpn.deltas.{p}"], perm, 4)
    out["rpn.cell_anchors"] = anchors[perm].contiguous()
    return out


def _finish(
    out: dict[str, torch.Tensor], arch: ArchConfig, conventions: Conventions, fmt: str
) -> Converted:
    """Final check against the canonical table (a converter bug, never a file problem)."""
    shapes = {n: tuple(t.shape) for n, t in out.items()}
    check_shapes(shapes, canonical_shapes(arch, conventions), f"converted {fmt} state dict")
    return Converted(out, conventions, fmt)


def _convert_detectron2(
    raw: Any, arch: ArchConfig, fmt: str, *, require_anchors: bool
) -> Converted:
    """airsplay and HF share names and layout; HF also stores its cell anchors."""
    sd, stored_anchors = _split_extras(source_state_dict(raw))
    if require_anchors and stored_anchors is None:
        raise WeightsError(f"{fmt} checkpoint is missing {d2.D2_CELL_ANCHORS_KEY}")
    k = arch.num_classes
    out = _rename(
        sd,
        arch,
        DETECTRON2_CONVENTIONS,
        d2.AIRSPLAY_ATTR_MODULES,
        {
            "roi_heads.bbox_pred.weight": (4 * k, arch.feature_dim),
            "roi_heads.bbox_pred.bias": (4 * k,),
        },
        f"{fmt} checkpoint",
    )
    # Background: last -> 0 (classes, embedding); zero deltas for it; no-attribute: last -> 0.
    for key in (
        "roi_heads.cls_score.weight",
        "roi_heads.cls_score.bias",
        "roi_heads.attr.embedding.weight",
        "roi_heads.attr.score.weight",
        "roi_heads.attr.score.bias",
    ):
        out[key] = d2.roll_last_to_first(out[key])
    for key in ("roi_heads.bbox_pred.weight", "roi_heads.bbox_pred.bias"):
        out[key] = d2.insert_background_box_rows(out[key])
    anchors = _anchors(stored_anchors, AIRSPLAY_ANCHOR_SIZES, arch)
    out = _reorder_rpn(out, anchors, two_way=False)
    return _finish(out, arch, DETECTRON2_CONVENTIONS, fmt)


def convert_airsplay(raw: Any, *, arch: ArchConfig | None = None) -> Converted:
    """airsplay ``faster_rcnn_from_caffe_attr{,_original}.pkl`` object -> canonical.

    Args:
        raw: the unpickled ``{"model": {name: np.ndarray}, ...}`` (or the inner dict).
        arch: expected architecture (default: the published ResNet-101, 1600/400).

    Raises:
        WeightsError: naming every missing key, unexpected key and wrong shape.
    """
    return _convert_detectron2(raw, arch or ArchConfig(), "airsplay", require_anchors=False)


def convert_hf(raw: Any, *, arch: ArchConfig | None = None) -> Converted:
    """HF ``unc-nlp/frcnn-vg-finetuned`` ``pytorch_model.bin`` state dict -> canonical.

    The cell anchors are read from the file (``...cell_anchors.0``) and reordered.
    """
    return _convert_detectron2(raw, arch or ArchConfig(), "hf", require_anchors=True)


def convert_milvlg(raw: Any, *, arch: ArchConfig | None = None) -> Converted:
    """MILVLG ``bua-caffe-frcn-r101*.pth`` checkpoint -> canonical.

    Class and attribute rows are already in Caffe order; only the anchor order changes. The
    anchors are detectron2's for sizes 4..32 unless the file stores its own.
    """
    arch = arch or ArchConfig()
    sd, stored_anchors = _split_extras(source_state_dict(raw))
    out = _rename(sd, arch, MILVLG_CONVENTIONS, d2.MILVLG_ATTR_MODULES, {}, "milvlg checkpoint")
    anchors = _anchors(stored_anchors, MILVLG_ANCHOR_SIZES, arch)
    out = _reorder_rpn(out, anchors, two_way=True)
    return _finish(out, arch, MILVLG_CONVENTIONS, "milvlg")


def convert_caffe(raw: CaffeLayers, *, arch: ArchConfig | None = None) -> Converted:
    """Original Caffe model (``read_caffemodel`` output) -> canonical, Caffe conventions."""
    arch = arch or ArchConfig()
    return _finish(caffe_state_dict(raw, arch=arch), arch, CAFFE_CONVENTIONS, "caffe")


CONVERTERS: dict[str, Callable[..., Converted]] = {
    "airsplay": convert_airsplay,
    "hf": convert_hf,
    "milvlg": convert_milvlg,
    "caffe": convert_caffe,
}


def _default_vocab(arch: ArchConfig) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Visual Genome vocabularies when the sizes match, else numbered placeholders."""
    from butd.detector.weights.registry import VG_ATTRIBUTES_VOCAB, VG_OBJECTS_VOCAB, load_vocab

    if (arch.num_classes, arch.num_attributes) == (1600, 400):
        return load_vocab(VG_OBJECTS_VOCAB), load_vocab(VG_ATTRIBUTES_VOCAB)
    logger.warning(
        "no vocabulary for %d/%d classes: numbered names", arch.num_classes, arch.num_attributes
    )
    objects = tuple(f"object_{i}" for i in range(arch.num_classes))
    return objects, tuple(f"attribute_{i}" for i in range(arch.num_attributes))


def convert(
    src_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    arch: ArchConfig | None = None,
    vocab: tuple[tuple[str, ...], tuple[str, ...]] | None = None,
    description: str = "",
    source_sha256: str | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Convert a published checkpoint file into a canonical ``.safetensors`` file.

    Args:
        src_path: the downloaded file.
        out_path: canonical file to write (atomically).
        fmt: "auto" (``detect_format``) or one of ``CONVERTIBLE_FORMATS``.
        arch: expected architecture (default: published ResNet-101, 1600/400).
        vocab: (objects, attributes); default: the Visual Genome vocabularies.
        description: stored in the spec.
        source_sha256: digest of ``src_path`` if already known (computed otherwise).
        trust_pickle: see ``read_source``.

    Returns:
        ``out_path``.
    """
    arch = arch or ArchConfig()
    if fmt == "caffe":
        raw: Any = read_caffemodel(src_path)
    else:
        raw = read_source(src_path, trust_pickle=trust_pickle)
    if fmt == "auto":
        fmt = detect_format(raw)
    if fmt not in CONVERTERS:
        raise WeightsError(f"unknown format {fmt!r}; expected one of {CONVERTIBLE_FORMATS}")
    converted = CONVERTERS[fmt](raw, arch=arch)
    del raw
    objects, attributes = vocab or _default_vocab(arch)
    spec = ModelSpec(
        arch=arch,
        conventions=converted.conventions,
        objects_vocab=objects,
        attributes_vocab=attributes,
        description=description or f"converted from {Path(src_path).name} ({fmt})",
    )
    sha = source_sha256 or file_sha256(src_path)
    logger.info("converting %s (%s, sha256 %s)", src_path, fmt, sha)
    return save_canonical(
        out_path, converted.state_dict, spec, source_sha256=sha, source_format=fmt
    )
