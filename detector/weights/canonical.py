"""The canonical weight file: the state dict of ``butd.detector.model.Detector`` in safetensors.

Every published checkpoint is converted once into this layout (``formats.py``); the extractor
and the trainer only ever read canonical files. The expected keys and shapes are a pure
function of ``ArchConfig`` (plus the RPN score layout of the ``Conventions``), so a file is
checked against its own spec before any tensor reaches the model.

Shape glossary (ArchConfig names):
    C0  stem channels (64)           W_i  bottleneck width of stage i (64, 128, 256, 512)
    R_c RPN conv channels (512)      A    anchors per cell (12)
    K   object classes (1600)        A_t  attributes (400)
    D   feature size = 4 * W_res5    E    class-embedding size (256)   H  attribute hidden (512)

File layout: safetensors tensors (float32) plus string metadata
``{"butd_format": "1", "spec": json(ModelSpec), "source_sha256", "source_format"}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from butd.detector.config import ArchConfig, Conventions, ModelSpec

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1"
BN_BUFFERS = ("weight", "bias", "running_mean", "running_var")
Shapes = dict[str, tuple[int, ...]]


class WeightsError(ValueError):
    """A weight file that cannot be used: wrong keys or shapes, unknown format, bad hash.

    Attributes:
        missing: expected keys absent from the file.
        unexpected: keys in the file that nothing expects.
        wrong_shapes: ``{key: (got, expected)}``.
    """

    def __init__(
        self,
        message: str,
        *,
        missing: tuple[str, ...] = (),
        unexpected: tuple[str, ...] = (),
        wrong_shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.wrong_shapes = dict(wrong_shapes or {})


@dataclass(frozen=True)
class LoadedWeights:
    """A verified canonical file in memory.

    Attributes:
        state_dict: canonical key -> float32 tensor (CPU), ready for ``Detector.load_state_dict``.
        spec: architecture, conventions, vocabularies and description stored with the tensors.
        sha256: hex digest of the canonical file itself (the ``weights_sha256`` of
            ``model_version``).
        source_format: format the file was converted from ("airsplay", "hf", "milvlg", ...).
        source_sha256: hex digest of the original download ("" when unknown).
    """

    state_dict: dict[str, torch.Tensor]
    spec: ModelSpec
    sha256: str
    source_format: str
    source_sha256: str


def _add_bn(shapes: Shapes, prefix: str, channels: int) -> None:
    for name in BN_BUFFERS:
        shapes[f"{prefix}.{name}"] = (channels,)


def _add_stage(
    shapes: Shapes, prefix: str, in_ch: int, width: int, blocks: int, stride: int
) -> int:
    """Bottleneck keys of one stage; returns its output channels (4 * width)."""
    out_ch = 4 * width
    for b in range(blocks):
        block_in = in_ch if b == 0 else out_ch
        p = f"{prefix}.{b}"
        shapes[f"{p}.conv1.weight"] = (width, block_in, 1, 1)
        _add_bn(shapes, f"{p}.bn1", width)
        shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
        _add_bn(shapes, f"{p}.bn2", width)
        shapes[f"{p}.conv3.weight"] = (out_ch, width, 1, 1)
        _add_bn(shapes, f"{p}.bn3", out_ch)
        # A projection shortcut wherever the identity cannot be added: first block only.
        if b == 0 and (stride != 1 or block_in != out_ch):
            shapes[f"{p}.shortcut.weight"] = (out_ch, block_in, 1, 1)
            _add_bn(shapes, f"{p}.shortcut_bn", out_ch)
    return out_ch


def canonical_shapes(arch: ArchConfig, conventions: Conventions | None = None) -> Shapes:
    """Every key of the canonical state dict with its shape, in module order.

    Args:
        arch: network shape.
        conventions: only ``rpn_score`` matters: "softmax2" gives 2A objectness channels,
            "sigmoid" gives A. Defaults to ``Conventions()`` (Caffe, softmax2).

    Returns:
        ``{key: shape}`` for stem, res2..res4 (``backbone.``), res5 (``roi_heads.res5``), the
        RPN (``rpn.``, including the ``rpn.cell_anchors`` (A, 4) buffer) and the heads.
    """
    conventions = conventions or Conventions()
    shapes: Shapes = {"backbone.stem.conv.weight": (arch.stem_channels, 3, 7, 7)}
    _add_bn(shapes, "backbone.stem.bn", arch.stem_channels)
    ch = arch.stem_channels
    stages = (("backbone.res2", 1), ("backbone.res3", 2), ("backbone.res4", 2))
    for i, (prefix, stride) in enumerate(stages):
        ch = _add_stage(shapes, prefix, ch, arch.stage_widths[i], arch.stage_blocks[i], stride)
    a, rc = arch.num_anchors, arch.rpn_channels
    score_ch = 2 * a if conventions.rpn_score == "softmax2" else a
    shapes["rpn.conv.weight"] = (rc, arch.res4_channels, 3, 3)
    shapes["rpn.conv.bias"] = (rc,)
    shapes["rpn.objectness.weight"] = (score_ch, rc, 1, 1)
    shapes["rpn.objectness.bias"] = (score_ch,)
    shapes["rpn.deltas.weight"] = (4 * a, rc, 1, 1)
    shapes["rpn.deltas.bias"] = (4 * a,)
    shapes["rpn.cell_anchors"] = (a, 4)
    # res5 runs on pooled RoIs: stride 1 (the dilation does not change any shape).
    _add_stage(shapes, "roi_heads.res5", ch, arch.stage_widths[3], arch.stage_blocks[3], 1)
    k1, d = arch.num_classes + 1, arch.feature_dim
    shapes["roi_heads.cls_score.weight"] = (k1, d)
    shapes["roi_heads.cls_score.bias"] = (k1,)
    shapes["roi_heads.bbox_pred.weight"] = (4 * k1, d)
    shapes["roi_heads.bbox_pred.bias"] = (4 * k1,)
    shapes["roi_heads.attr.embedding.weight"] = (k1, arch.attr_embed_dim)
    shapes["roi_heads.attr.fc.weight"] = (arch.attr_hidden, d + arch.attr_embed_dim)
    shapes["roi_heads.attr.fc.bias"] = (arch.attr_hidden,)
    shapes["roi_heads.attr.score.weight"] = (arch.num_attributes + 1, arch.attr_hidden)
    shapes["roi_heads.attr.score.bias"] = (arch.num_attributes + 1,)
    return shapes


def check_shapes(
    actual: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str
) -> None:
    """Raise ``WeightsError`` naming every missing key, unexpected key and wrong shape.

    Args:
        actual: ``{key: shape}`` found.
        expected: ``{key: shape}`` required.
        what: the file or checkpoint, for the message.
    """
    missing = tuple(k for k in expected if k not in actual)
    unexpected = tuple(k for k in actual if k not in expected)
    wrong = {
        k: (tuple(actual[k]), tuple(expected[k]))
        for k in expected
        if k in actual and tuple(actual[k]) != tuple(expected[k])
    }
    if not (missing or unexpected or wrong):
        return
    parts = []
    if missing:
        parts.append(f"missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    if wrong:
        items = (f"{k} is {list(g)}, expected {list(e)}" for k, (g, e) in wrong.items())
        parts.append(f"wrong shapes ({len(wrong)}): {'; '.join(items)}")
    raise WeightsError(
        f"{what} does not fit the architecture: " + " | ".join(parts),
        missing=missing,
        unexpected=unexpected,
        wrong_shapes=wrong,
    )


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> None:
    """Byte-deterministic safetensors writer (float32 only).

    ``safetensors.torch.save_file`` orders the metadata through a hash map, so the same
    weights give a different file (and sha256, hence ``model_version``) on every run. Here the
    header is sorted JSON and the data follow in key order: equal inputs, equal bytes.

    Layout (safetensors spec): u64 little-endian header length, JSON header padded with
    spaces to a multiple of 8, then the raw little-endian tensor data.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * 4
        header[key] = {
            "dtype": "F32",
            "shape": list(tensors[key].shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key in sorted(tensors):
            f.write(tensors[key].numpy().astype("<f4", copy=False).tobytes())


def save_canonical(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    spec: ModelSpec,
    *,
    source_sha256: str | None,
    source_format: str,
) -> Path:
    """Write a canonical file atomically (temporary name, then rename).

    Args:
        path: destination ``.safetensors`` file.
        state_dict: canonical key -> tensor; checked against ``canonical_shapes(spec.arch)``.
            Tensors are stored as float32; the file is byte-deterministic.
        spec: stored as JSON in the metadata.
        source_sha256: hex digest of the file this was converted from (None if not a
            conversion, e.g. a trained demo model).
        source_format: "airsplay", "hf", "milvlg", "trained", ...

    Returns:
        The path written.

    Raises:
        WeightsError: keys or shapes do not fit ``spec.arch``.
    """
    path = Path(path)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    check_shapes(shapes, canonical_shapes(spec.arch, spec.conventions), "state dict")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    metadata = {
        "butd_format": FORMAT_VERSION,
        "spec": json.dumps(spec.to_json(), sort_keys=True),
        "source_sha256": source_sha256 or "",
        "source_format": source_format,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    _write_safetensors(tmp, tensors, metadata)
    os.replace(tmp, path)
    logger.info("wrote %s (%d tensors, from %s)", path, len(tensors), source_format)
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The safetensors metadata of a canonical file (tensors are not read).

    Raises:
        WeightsError: not a safetensors file, or not a butd canonical file.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for any bad header
        raise WeightsError(f"{path} is not a safetensors file: {exc}") from exc
    if meta.get("butd_format") != FORMAT_VERSION:
        raise WeightsError(
            f"{path} is not a butd canonical file: butd_format is "
            f"{meta.get('butd_format')!r}, expected {FORMAT_VERSION!r} "
            "(convert it with `butd weights convert`)"
        )
    return dict(meta)


def is_canonical_file(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a readable butd canonical safetensors file."""
    try:
        read_metadata(path)
    except (WeightsError, OSError):
        return False
    return True


def load(path: str | os.PathLike[str]) -> LoadedWeights:
    """Read and verify a canonical file.

    Args:
        path: a ``.safetensors`` file written by ``save_canonical``.

    Returns:
        LoadedWeights with float32 CPU tensors, the spec and the file's sha256.

    Raises:
        WeightsError: not a canonical file, or keys/shapes that do not fit the stored spec
            (every missing key, unexpected key and wrong shape is named).
    """
    meta = read_metadata(path)
    spec = ModelSpec.from_json(json.loads(meta["spec"]))
    with safe_open(str(path), framework="pt") as f:
        state_dict = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    check_shapes(shapes, canonical_shapes(spec.arch, spec.conventions), str(path))
    sha = file_sha256(path)
    logger.info("loaded weights %s sha256=%s (%s)", path, sha[:12], spec.description or "-")
    return LoadedWeights(
        state_dict=state_dict,
        spec=spec,
        sha256=sha,
        source_format=meta.get("source_format", ""),
        source_sha256=meta.get("source_sha256", ""),
    )
