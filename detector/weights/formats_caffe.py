"""The original Caffe ``.caffemodel`` (peteanderson80/bottom-up-attention) -> canonical.

A caffemodel is a protobuf ``NetParameter``. Only a few fields matter, so the wire format is
decoded here directly (no protobuf dependency): ``NetParameter.layer = 100``
(``LayerParameter``: ``name = 1``, ``blobs = 7``) or the legacy ``layers = 2``
(``V1LayerParameter``: ``name = 4``, ``blobs = 6``); ``BlobProto``: ``shape = 7``
(``BlobShape.dim = 1``), ``data = 5`` (packed float), ``double_data = 8``, legacy
``num/channels/height/width = 1..4`` (caffe.proto of the BUTD repo).

Layer names (reference §1.2, §9.1): ``conv1``/``bn_conv1``/``scale_conv1``; per block
``res{S}{B}_branch{1,2a,2b,2c}`` with ``bn...`` and ``scale...``, where B is ``a`` for the first
block, ``b1..bN`` in stages with more than 3 blocks (res3, res4), else ``b, c``;
``rpn_conv/3x3``, ``rpn_cls_score``, ``rpn_bbox_pred``, ``cls_score``, ``bbox_pred``,
``cls_embedding``, ``fc_attr``, ``attr_score``. Caffe BatchNorm stores (mean * f, var * f, f):
the statistics are blob / f (0 when f = 0, as Caffe does); Scale holds gamma and beta.
Every tensor is already in the canonical order (background 0, ratio-major anchors, 2A
objectness as background block then foreground block).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from butd.detector.anchors import caffe_cell_anchors
from butd.detector.config import ArchConfig, Conventions
from butd.detector.weights.canonical import WeightsError, canonical_shapes, check_shapes

logger = logging.getLogger(__name__)

CAFFE_CONVENTIONS = Conventions()  # the defaults are Caffe's (reference §1, §14)
# Canonical block module -> Caffe branch suffix.
_BRANCHES = {
    "conv1": "2a", "bn1": "2a", "conv2": "2b", "bn2": "2b", "conv3": "2c", "bn3": "2c",
    "shortcut": "1", "shortcut_bn": "1",
}  # fmt: skip


class CaffeLayers(dict[str, list[np.ndarray]]):
    """Layer name -> its parameter blobs, as read from a ``.caffemodel``."""


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message; value is bytes for wire type 2."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield field, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            if pos + length > len(buf):
                raise WeightsError(f"caffemodel: truncated field {field} ({length} bytes)")
            yield field, wire, buf[pos : pos + length]
            pos += length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield field, wire, buf[pos : pos + size]
            pos += size
        else:
            raise WeightsError(f"caffemodel: unsupported protobuf wire type {wire}")


def _blob(buf: memoryview) -> np.ndarray:
    """A ``BlobProto`` as a float32 array of its declared shape."""
    dims: list[int] = []
    legacy = [0, 0, 0, 0]
    chunks: list[np.ndarray] = []
    for field, _, value in _fields(buf):
        if field == 7 and isinstance(value, memoryview):  # BlobShape
            for f2, w2, v2 in _fields(value):
                if f2 == 1 and isinstance(v2, memoryview) and w2 == 2:  # packed dims
                    pos = 0
                    while pos < len(v2):
                        d, pos = _varint(v2, pos)
                        dims.append(d)
                elif f2 == 1 and isinstance(v2, int):
                    dims.append(v2)
        elif field in (5, 8) and isinstance(value, memoryview):
            dtype = "<f4" if field == 5 else "<f8"
            chunks.append(np.frombuffer(value, dtype=dtype).astype(np.float32))
        elif field in (1, 2, 3, 4) and isinstance(value, int):
            legacy[field - 1] = value
    data = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    shape = tuple(dims) if dims else tuple(legacy)
    if int(np.prod(shape)) != data.size:
        raise WeightsError(f"caffemodel blob of shape {shape} holds {data.size} values")
    return data.reshape(shape)


def read_caffemodel(path: str | os.PathLike[str]) -> CaffeLayers:
    """Layer name -> blobs for every layer with parameters.

    Raises:
        WeightsError: not a parseable caffemodel, or a layer name seen twice.
    """
    buf = memoryview(Path(path).read_bytes())
    layers = CaffeLayers()
    try:
        for field, _, value in _fields(buf):
            if field not in (100, 2) or not isinstance(value, memoryview):
                continue
            name_field, blob_field = (1, 7) if field == 100 else (4, 6)
            name, blobs = "", []
            for f2, _, v2 in _fields(value):
                if f2 == name_field and isinstance(v2, memoryview):
                    name = bytes(v2).decode()
                elif f2 == blob_field and isinstance(v2, memoryview):
                    blobs.append(_blob(v2))
            if blobs:
                if name in layers:
                    raise WeightsError(f"caffemodel: layer {name!r} appears twice")
                layers[name] = blobs
    except (IndexError, UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable caffemodel ({exc})") from exc
    logger.info("read %d layers with parameters from %s", len(layers), path)
    return layers


def caffe_block(stage: int, index: int, blocks: int) -> str:
    """Caffe block id: ``res4a``, ``res4b7``, ``res2c`` (stage 2..5, 0-based index)."""
    if index == 0:
        return f"{stage}a"
    if blocks > 3:
        return f"{stage}b{index}"
    return f"{stage}{chr(ord('a') + index)}"


def _source(key: str, arch: ArchConfig) -> tuple[str, int]:
    """(Caffe layer, blob index) a canonical key comes from; BN stats use the bn layer."""
    parts = key.split(".")
    param = parts[-1]
    if parts[1] == "stem":
        conv, bn, scale = "conv1", "bn_conv1", "scale_conv1"
    elif parts[1].startswith("res"):
        stage, index, module = int(parts[1][3]), int(parts[2]), parts[3]
        block = caffe_block(stage, index, arch.stage_blocks[stage - 2])
        branch = _BRANCHES[module]
        conv, bn = f"res{block}_branch{branch}", f"bn{block}_branch{branch}"
        scale = f"scale{block}_branch{branch}"
    else:
        module = ".".join(parts[1:-1])
        names = {
            "conv": "rpn_conv/3x3", "objectness": "rpn_cls_score", "deltas": "rpn_bbox_pred",
            "cls_score": "cls_score", "bbox_pred": "bbox_pred",
            "attr.embedding": "cls_embedding", "attr.fc": "fc_attr", "attr.score": "attr_score",
        }  # fmt: skip
        return names[module], 0 if param == "weight" else 1
    is_bn = parts[-2] in ("bn", "bn1", "bn2", "bn3", "shortcut_bn")
    if not is_bn:
        return conv, 0
    if param in ("running_mean", "running_var"):
        return bn, 0 if param == "running_mean" else 1
    return scale, 0 if param == "weight" else 1


def _fit(blob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The blob in ``shape`` (legacy 4-D blobs lose leading 1s), or None if it does not fit."""
    while blob.ndim > len(shape) and blob.shape[0] == 1:
        blob = blob.reshape(blob.shape[1:])
    return blob if blob.shape == shape else None


def caffe_state_dict(
    layers: CaffeLayers, *, arch: ArchConfig | None = None
) -> dict[str, torch.Tensor]:
    """Caffe layers -> canonical state dict (Caffe conventions, Caffe anchors).

    Raises:
        WeightsError: naming every missing blob, unexpected layer and wrong shape, each as
            ``layer[blob] -> canonical key``.
    """
    arch = arch or ArchConfig()
    if arch.num_anchors != 12:
        raise WeightsError(f"Caffe anchors are 3 ratios x 4 scales; arch has {arch.num_anchors}")
    shapes = canonical_shapes(arch, CAFFE_CONVENTIONS)
    shapes.pop("rpn.cell_anchors")
    out: dict[str, torch.Tensor] = {}
    expected: dict[str, tuple[int, ...]] = {}
    found: dict[str, tuple[int, ...]] = {}
    for key, shape in shapes.items():
        layer, index = _source(key, arch)
        label = f"{layer}[{index}] -> {key}"
        expected[label] = shape
        blobs = layers.get(layer, [])
        if index >= len(blobs):
            continue  # reported as missing
        blob = blobs[index]
        if key.endswith(("running_mean", "running_var")) and len(blobs) > 2:
            factor = float(blobs[2].reshape(-1)[0])  # Caffe moving-average factor
            blob = blob * np.float32(0.0 if factor == 0 else 1.0 / factor)
        fitted = _fit(blob, shape)
        found[label] = shape if fitted is not None else tuple(blob.shape)
        if fitted is not None:
            out[key] = torch.from_numpy(np.ascontiguousarray(fitted, dtype=np.float32))
    used = {label.split("[")[0] for label in expected}
    for name in sorted(set(layers) - used):
        found[f"layer {name}"] = ()
    check_shapes(found, expected, "caffemodel")
    out["rpn.cell_anchors"] = caffe_cell_anchors()
    return out
