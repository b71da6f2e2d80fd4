"""Synthetic checkpoints with exactly the published key names and shapes (reference §9.2).

Builders for the three published PyTorch formats (seeded random values), a canonical random
state dict for any ArchConfig, and ``expected_canonical``: what a correct converter must
produce from a source checkpoint. Everything here is written from the reference tables, not
from ``butd.detector.weights`` code, so the converter tests compare against an independent
computation (index lists built from the anchor (size, ratio) pairs, explicit row moves).

Sizes: the default ArchConfig gives the full ResNet-101 (about 65.6M floats, 262 MB float32).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch

from butd.detector.config import ArchConfig, Conventions

AIRSPLAY_SIZES = (64.0, 128.0, 256.0, 512.0)
MILVLG_SIZES = (4.0, 8.0, 16.0, 32.0)
RATIOS = (0.5, 1.0, 2.0)
CELL_ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
BN = ("weight", "bias", "running_mean", "running_var")


def _bn(shapes: dict[str, tuple[int, ...]], prefix: str, ch: int) -> None:
    for name in BN:
        shapes[f"{prefix}.{name}"] = (ch,)


def d2_resnet_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """detectron2 ResNet keys: ``backbone.stem``, ``backbone.res2..4``, ``roi_heads.res5``."""
    shapes: dict[str, tuple[int, ...]] = {
        "backbone.stem.conv1.weight": (arch.stem_channels, 3, 7, 7)
    }
    _bn(shapes, "backbone.stem.conv1.norm", arch.stem_channels)
    cin = arch.stem_channels
    for i, stage in enumerate(
        ("backbone.res2", "backbone.res3", "backbone.res4", "roi_heads.res5")
    ):
        width = arch.stage_widths[i]
        out = 4 * width
        for b in range(arch.stage_blocks[i]):
            block_in = cin if b == 0 else out
            p = f"{stage}.{b}"
            for conv, shape in (
                ("conv1", (width, block_in, 1, 1)),
                ("conv2", (width, width, 3, 3)),
                ("conv3", (out, width, 1, 1)),
            ):
                shapes[f"{p}.{conv}.weight"] = shape
                _bn(shapes, f"{p}.{conv}.norm", shape[0])
            if b == 0:  # every published first block projects (channels change)
                shapes[f"{p}.shortcut.weight"] = (out, block_in, 1, 1)
                _bn(shapes, f"{p}.shortcut.norm", out)
        cin = out
    return shapes


def _d2_shapes(arch: ArchConfig, milvlg: bool) -> dict[str, tuple[int, ...]]:
    a, rc, k, d = arch.num_anchors, arch.rpn_channels, arch.num_classes, arch.feature_dim
    e, h, at = arch.attr_embed_dim, arch.attr_hidden, arch.num_attributes
    rpn, bp = "proposal_generator.rpn_head", "roi_heads.box_predictor"
    score = 2 * a if milvlg else a  # MILVLG: 2-way softmax; airsplay/HF: one sigmoid logit
    box = 4 * (k + 1) if milvlg else 4 * k  # airsplay/HF: no background box row
    emb, fc, out = ("cls_embed", "attr_linear1", "attr_linear2") if milvlg else (
        "cls_embedding", "fc_attr", "attr_score")  # fmt: skip
    shapes = d2_resnet_shapes(arch)
    shapes.update(
        {
            f"{rpn}.conv.weight": (rc, arch.res4_channels, 3, 3),
            f"{rpn}.conv.bias": (rc,),
            f"{rpn}.objectness_logits.weight": (score, rc, 1, 1),
            f"{rpn}.objectness_logits.bias": (score,),
            f"{rpn}.anchor_deltas.weight": (4 * a, rc, 1, 1),
            f"{rpn}.anchor_deltas.bias": (4 * a,),
            f"{bp}.cls_score.weight": (k + 1, d),
            f"{bp}.cls_score.bias": (k + 1,),
            f"{bp}.bbox_pred.weight": (box, d),
            f"{bp}.bbox_pred.bias": (box,),
            f"{bp}.{emb}.weight": (k + 1, e),
            f"{bp}.{fc}.weight": (h, d + e),
            f"{bp}.{fc}.bias": (h,),
            f"{bp}.{out}.weight": (at + 1, h),
            f"{bp}.{out}.bias": (at + 1,),
        }
    )
    return shapes


def airsplay_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """airsplay ``.pkl`` / HF ``.bin`` keys (HF adds anchors and num_batches_tracked)."""
    return _d2_shapes(arch, milvlg=False)


def milvlg_shapes(arch: ArchConfig) -> dict[str, tuple[int, ...]]:
    """MILVLG ``.pth`` keys: 2A objectness, 4(K+1) bbox rows, cls_embed / attr_linear1/2."""
    return _d2_shapes(arch, milvlg=True)


def _random_arrays(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, shape in shapes.items():
        arr = rng.standard_normal(shape, dtype=np.float32)
        if key.endswith("running_var"):
            arr = np.abs(arr) + np.float32(0.5)
        out[key] = arr
    return out


def d2_size_major_anchors(sizes: tuple[float, ...]) -> np.ndarray:
    """(len(sizes) * 3, 4) detectron2 cell anchors: row = size_idx * 3 + ratio_idx."""
    rows = []
    for size in sizes:
        for ratio in RATIOS:
            w = math.sqrt(size**2 / ratio)
            h = ratio * w
            rows.append((-w / 2, -h / 2, w / 2, h / 2))
    return np.array(rows, dtype=np.float32)


def airsplay_checkpoint(arch: ArchConfig | None = None, seed: int = 0) -> dict[str, Any]:
    """``faster_rcnn_from_caffe_attr.pkl`` layout: ``{"model": {name: ndarray}, "__author__"}``."""
    arrays = _random_arrays(airsplay_shapes(arch or ArchConfig()), seed)
    return {"model": arrays, "__author__": "synthetic (tests/unit/synthetic_checkpoints.py)"}


def hf_state_dict(arch: ArchConfig | None = None, seed: int = 1) -> dict[str, torch.Tensor]:
    """HF ``pytorch_model.bin``: flat tensors, cell anchors, num_batches_tracked on every BN."""
    arch = arch or ArchConfig()
    sd = {k: torch.from_numpy(v) for k, v in _random_arrays(airsplay_shapes(arch), seed).items()}
    for key in [k for k in sd if k.endswith(".running_var")]:
        sd[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(0)
    sd[CELL_ANCHORS_KEY] = torch.from_numpy(d2_size_major_anchors(AIRSPLAY_SIZES))
    return sd


def milvlg_checkpoint(arch: ArchConfig | None = None, seed: int = 2) -> dict[str, Any]:
    """MILVLG ``.pth`` layout: ``{"model": tensors}``; res4/res5 BN carry num_batches_tracked."""
    arch = arch or ArchConfig()
    sd = {k: torch.from_numpy(v) for k, v in _random_arrays(milvlg_shapes(arch), seed).items()}
    for key in [k for k in sd if k.endswith(".running_var")]:
        if key.startswith(("backbone.res4.", "roi_heads.res5.")):
            sd[key.replace(".running_var", ".num_batches_tracked")] = torch.tensor(1000)
    return {"model": sd, "iteration": 0}


# ---------------------------------------------------------------------------------------------
# What a correct conversion produces (independent of butd.detector.weights)


def canonical_resnet_name(src: str) -> str:
    """detectron2 ResNet key -> canonical key (contracts table)."""
    name = src.replace("backbone.stem.conv1.norm.", "backbone.stem.bn.")
    name = name.replace("backbone.stem.conv1.weight", "backbone.stem.conv.weight")
    name = name.replace(".shortcut.norm.", ".shortcut_bn.")
    return re.sub(r"\.conv([123])\.norm\.", r".bn\1.", name)


def anchor_index_map(n_sizes: int, n_ratios: int) -> list[int]:
    """Canonical anchor a (ratio-major) -> source anchor d (size-major), via (size, ratio)."""
    pairs_src = [(s, r) for s in range(n_sizes) for r in range(n_ratios)]  # d -> (s, r)
    pairs_canon = [(s, r) for r in range(n_ratios) for s in range(n_sizes)]  # a -> (s, r)
    return [pairs_src.index(pair) for pair in pairs_canon]


def expected_canonical(
    fmt: str, source: dict[str, Any], arch: ArchConfig
) -> dict[str, torch.Tensor]:
    """The canonical state dict a faithful converter must produce from ``source``."""
    sd = source.get("model", source)
    sd = {k: torch.as_tensor(np.asarray(v)) for k, v in sd.items()}
    out = {canonical_resnet_name(k): v for k, v in sd.items() if ".res" in k or ".stem." in k}
    out = {k: v for k, v in out.items() if not k.endswith("num_batches_tracked")}
    rpn, bp = "proposal_generator.rpn_head", "roi_heads.box_predictor"
    out["rpn.conv.weight"] = sd[f"{rpn}.conv.weight"]
    out["rpn.conv.bias"] = sd[f"{rpn}.conv.bias"]
    a_map = anchor_index_map(4, 3)
    a = arch.num_anchors
    two_way = fmt == "milvlg"
    for p in ("weight", "bias"):
        obj = sd[f"{rpn}.objectness_logits.{p}"]
        idx = [k * a + a_map[i] for k in range(2) for i in range(a)] if two_way else a_map
        out[f"rpn.objectness.{p}"] = obj[idx]
        deltas = sd[f"{rpn}.anchor_deltas.{p}"]
        out[f"rpn.deltas.{p}"] = deltas[[a_map[i] * 4 + g for i in range(a) for g in range(4)]]
    if fmt == "hf":
        src_anchors = sd[CELL_ANCHORS_KEY]
    else:
        src_anchors = torch.from_numpy(
            d2_size_major_anchors(MILVLG_SIZES if two_way else AIRSPLAY_SIZES)
        )
    out["rpn.cell_anchors"] = src_anchors[a_map]
    k, at = arch.num_classes, arch.num_attributes
    if two_way:
        names = {
            "cls_embed": "attr.embedding",
            "attr_linear1": "attr.fc",
            "attr_linear2": "attr.score",
        }
        for src_mod, dst_mod in {
            **names,
            "cls_score": "cls_score",
            "bbox_pred": "bbox_pred",
        }.items():
            for key in [x for x in sd if x.startswith(f"{bp}.{src_mod}.")]:
                out[f"roi_heads.{dst_mod}.{key.rsplit('.', 1)[1]}"] = sd[key]
        return out
    cls_rows = [k, *range(k)]  # background (last) first
    attr_rows = [at, *range(at)]  # no-attribute (last) first
    for p in ("weight", "bias"):
        out[f"roi_heads.cls_score.{p}"] = sd[f"{bp}.cls_score.{p}"][cls_rows]
        src_box = sd[f"{bp}.bbox_pred.{p}"]
        out[f"roi_heads.bbox_pred.{p}"] = torch.cat([torch.zeros_like(src_box[:4]), src_box])
        out[f"roi_heads.attr.fc.{p}"] = sd[f"{bp}.fc_attr.{p}"]
        out[f"roi_heads.attr.score.{p}"] = sd[f"{bp}.attr_score.{p}"][attr_rows]
    out["roi_heads.attr.embedding.weight"] = sd[f"{bp}.cls_embedding.weight"][cls_rows]
    return out


# ---------------------------------------------------------------------------------------------
# Canonical random weights (for model tests)


def caffe_cell_anchors() -> torch.Tensor:
    """(12, 4) Caffe ``generate_anchors(16, (0.5, 1, 2), (4, 8, 16, 32))``, ratio-major."""
    rows = []
    for ratio in RATIOS:
        ws = np.round(np.sqrt(256.0 / ratio))
        hs = np.round(ws * ratio)
        for scale in (4, 8, 16, 32):
            w, h = ws * scale, hs * scale
            rows.append(
                (7.5 - 0.5 * (w - 1), 7.5 - 0.5 * (h - 1), 7.5 + 0.5 * (w - 1), 7.5 + 0.5 * (h - 1))
            )
    return torch.tensor(rows, dtype=torch.float32)


def random_canonical_state_dict(
    arch: ArchConfig, seed: int = 0, conventions: Conventions | None = None
) -> dict[str, torch.Tensor]:
    """A canonical state dict of random weights with sane scales (He-init convs, BN ~ identity).

    Args:
        arch: architecture (``tiny_arch()`` or the full ``ArchConfig()``).
        seed: torch generator seed.
        conventions: only ``rpn_score`` matters (2A or A objectness channels).

    Returns:
        ``{canonical key: float32 tensor}``; ``rpn.cell_anchors`` are Caffe's (A must be 12).
    """
    from butd.detector.weights import canonical_shapes

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in canonical_shapes(arch, conventions).items():
        noise = torch.randn(shape, generator=gen)
        if key == "rpn.cell_anchors":
            out[key] = caffe_cell_anchors()
        elif key.endswith("running_var"):
            out[key] = 0.75 + 0.5 * torch.rand(shape, generator=gen)
        elif key.endswith(".weight") and len(shape) == 1:  # BN scale
            out[key] = 1.0 + 0.1 * noise
        elif key.endswith((".bias", "running_mean")):
            out[key] = 0.05 * noise
        elif len(shape) == 4:  # conv: He init
            out[key] = noise * math.sqrt(2.0 / (shape[1] * shape[2] * shape[3]))
        else:  # linear and embedding
            out[key] = 0.01 * noise
    return out


# ---------------------------------------------------------------------------------------------
# The original Caffe model (layer names of models/vg/ResNet-101/.../test.prototxt)


def caffe_block_ids(arch: ArchConfig) -> list[tuple[str, int, int]]:
    """(Caffe block id, stage index 0..3, block index): res2a..c, res3a, res3b1..b3, ..."""
    ids = []
    for i, n in enumerate(arch.stage_blocks):
        stage = i + 2
        for b in range(n):
            if b == 0:
                ids.append((f"{stage}a", i, b))
            elif n > 3:
                ids.append((f"{stage}b{b}", i, b))
            else:
                ids.append((f"{stage}{'abc'[b]}", i, b))
    return ids


def caffe_layer_shapes(arch: ArchConfig) -> dict[str, list[tuple[int, ...]]]:
    """Layer name -> blob shapes (conv W; BatchNorm mean, var, factor; Scale gamma, beta)."""
    layers: dict[str, list[tuple[int, ...]]] = {}

    def conv_bn(conv: str, bn: str, scale: str, shape: tuple[int, ...]) -> None:
        layers[conv] = [shape]
        layers[bn] = [(shape[0],), (shape[0],), (1,)]
        layers[scale] = [(shape[0],), (shape[0],)]

    c0 = arch.stem_channels
    conv_bn("conv1", "bn_conv1", "scale_conv1", (c0, 3, 7, 7))
    cin = c0
    for block, i, b in caffe_block_ids(arch):
        width = arch.stage_widths[i]
        out = 4 * width
        block_in = cin if b == 0 else out
        for branch, shape in (
            ("2a", (width, block_in, 1, 1)),
            ("2b", (width, width, 3, 3)),
            ("2c", (out, width, 1, 1)),
        ):
            conv_bn(f"res{block}_branch{branch}", f"bn{block}_branch{branch}",
                    f"scale{block}_branch{branch}", shape)  # fmt: skip
        if b == 0:
            conv_bn(f"res{block}_branch1", f"bn{block}_branch1", f"scale{block}_branch1",
                    (out, block_in, 1, 1))  # fmt: skip
        if b == arch.stage_blocks[i] - 1:
            cin = out
    a, rc, k1, d = arch.num_anchors, arch.rpn_channels, arch.num_classes + 1, arch.feature_dim
    e, h = arch.attr_embed_dim, arch.attr_hidden
    layers["rpn_conv/3x3"] = [(rc, arch.res4_channels, 3, 3), (rc,)]
    layers["rpn_cls_score"] = [(2 * a, rc, 1, 1), (2 * a,)]
    layers["rpn_bbox_pred"] = [(4 * a, rc, 1, 1), (4 * a,)]
    layers["cls_score"] = [(k1, d), (k1,)]
    layers["bbox_pred"] = [(4 * k1, d), (4 * k1,)]
    layers["cls_embedding"] = [(k1, e)]
    layers["fc_attr"] = [(h, d + e), (h,)]
    layers["attr_score"] = [(arch.num_attributes + 1, h), (arch.num_attributes + 1,)]
    return layers


def caffe_layers(arch: ArchConfig | None = None, seed: int = 3) -> dict[str, list[np.ndarray]]:
    """Random Caffe blobs; BatchNorm factors ~1000 (Caffe's moving-average normaliser)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shapes in caffe_layer_shapes(arch or ArchConfig()).items():
        blobs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
        if name.startswith("bn"):
            blobs[1] = np.abs(blobs[1]) * 999.0 + 1.0  # var * factor, positive
            blobs[2] = np.array([999.982], dtype=np.float32)
        out[name] = blobs
    return out


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_blob(arr: np.ndarray, *, legacy_shape: bool = False) -> bytes:
    """A BlobProto: packed float data (5) and BlobShape (7), or legacy num/ch/h/w (1..4)."""
    data = _field(5, arr.astype("<f4").tobytes())
    if legacy_shape:
        dims = (1,) * (4 - arr.ndim) + arr.shape
        return b"".join(_varint(i << 3) + _varint(d) for i, d in enumerate(dims, 1)) + data
    shape = _field(1, b"".join(_varint(d) for d in arr.shape))
    return _field(7, shape) + data


def encode_caffemodel(
    layers: dict[str, list[np.ndarray]], *, v1: frozenset[str] = frozenset()
) -> bytes:
    """A NetParameter: ``layer`` (100) messages, or V1 ``layers`` (2) for names in ``v1``."""
    out = [_field(1, b"synthetic-butd")]
    for name, blobs in layers.items():
        legacy = name in v1
        name_field, blob_field, number = (4, 6, 2) if legacy else (1, 7, 100)
        body = _field(name_field, name.encode())
        body += _field(2, b"Convolution") if not legacy else _varint(5 << 3) + _varint(4)
        body += b"".join(_field(blob_field, encode_blob(b, legacy_shape=legacy)) for b in blobs)
        out.append(_field(number, body))
    out.append(_field(100, _field(1, b"relu1") + _field(2, b"ReLU")))  # a layer without blobs
    return b"".join(out)
