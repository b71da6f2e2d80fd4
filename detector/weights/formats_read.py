"""Reading published checkpoint files safely, and telling their formats apart.

``.pkl`` (detectron2 numpy pickles) go through an unpickler that can only build numpy arrays
and dicts; ``.bin`` / ``.pth`` through ``torch.load(weights_only=True)``; ``.caffemodel``
through the protobuf decoder of ``formats_caffe``. Detection looks at the content (key names,
value types, channel counts), not at file names, except for ``.caffemodel``.
"""

from __future__ import annotations

import codecs
import collections
import importlib
import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from butd.detector.weights import formats_d2 as d2
from butd.detector.weights.canonical import WeightsError, is_canonical_file
from butd.detector.weights.formats_caffe import CaffeLayers, read_caffemodel

logger = logging.getLogger(__name__)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 ``.pkl`` files: numpy arrays and plain containers only."""

    _NUMPY_MODULES = ("multiarray", "numeric")
    _NUMPY_FUNCTIONS = ("_reconstruct", "scalar", "_frombuffer")

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("_codecs", "encode"):  # protocol-2 pickles store bytes this way
            return codecs.encode
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        package, _, leaf = module.rpartition(".")
        if (
            package in ("numpy.core", "numpy._core")
            and leaf in self._NUMPY_MODULES
            and name in self._NUMPY_FUNCTIONS
        ):
            # numpy 2 moved numpy.core to numpy._core; old pickles name the former.
            core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
            return getattr(importlib.import_module(f"{core}.{leaf}"), name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def read_source(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Any:
    """Load a published checkpoint without executing arbitrary pickled code.

    Args:
        path: ``.pkl`` (numpy pickle), ``.bin`` / ``.pth`` (``torch.save``), ``.caffemodel``.
        trust_pickle: allow a full, unrestricted ``torch.load`` (only for files you trust)
            when the restricted loaders refuse the file.

    Returns:
        The unpickled object (a dict).

    Raises:
        WeightsError: a file none of the loaders accepts.
    """
    path = Path(path)
    if path.suffix == ".caffemodel":
        return read_caffemodel(path)
    if not zipfile.is_zipfile(path):
        try:
            with path.open("rb") as f:
                obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            if isinstance(obj, dict):
                return obj
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError):
            pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a refused or corrupt file
        if trust_pickle:
            logger.warning("loading %s with an unrestricted unpickler (--trust-pickle)", path)
            return torch.load(path, map_location="cpu", weights_only=False)
        raise WeightsError(
            f"{path}: not a numpy pickle or a weights-only torch checkpoint ({exc}); if you "
            "trust the file, retry with trust_pickle=True (--trust-pickle)"
        ) from exc


def source_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Flat ``{name: tensor}`` from a checkpoint object (``{"model": ...}`` is unwrapped)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"checkpoint is a {type(obj).__name__}, expected a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    bad = []
    for key, value in obj.items():
        if isinstance(value, np.ndarray):
            out[str(key)] = torch.from_numpy(np.ascontiguousarray(value))
        elif isinstance(value, torch.Tensor):
            out[str(key)] = value.detach()
        else:
            bad.append(f"{key} ({type(value).__name__})")
    if bad:
        raise WeightsError(f"checkpoint values that are not arrays: {', '.join(bad)}")
    return out


def detect_format(obj_or_path: Any) -> str:
    """Which format a checkpoint object or file is in.

    Returns:
        "airsplay", "hf", "milvlg", "caffe" (``.caffemodel``) or "canonical" (a butd file).

    Raises:
        WeightsError: none of them.
    """
    if isinstance(obj_or_path, (str, os.PathLike)):
        path = Path(obj_or_path)
        if path.suffix == ".caffemodel":
            return "caffe"
        if is_canonical_file(path):
            return "canonical"
        obj_or_path = read_source(path)
    obj = obj_or_path
    if isinstance(obj, CaffeLayers):
        return "caffe"
    wrapped = isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping)
    sd = obj["model"] if wrapped else obj
    if not isinstance(sd, Mapping):
        raise WeightsError(f"unrecognised checkpoint: a {type(obj).__name__}")
    keys = set(map(str, sd))
    if any(".box_predictor.cls_embed." in k or ".attr_linear1." in k for k in keys):
        return "milvlg"
    objectness = sd.get("proposal_generator.rpn_head.objectness_logits.weight")
    deltas = sd.get("proposal_generator.rpn_head.anchor_deltas.weight")
    if objectness is not None and deltas is not None and objectness.shape[0] * 2 == deltas.shape[0]:
        return "milvlg"  # 2A objectness channels against 4A deltas
    if "roi_heads.box_predictor.cls_score.weight" in keys:
        numpy_values = any(isinstance(v, np.ndarray) for v in sd.values())
        if d2.D2_CELL_ANCHORS_KEY in keys or not (wrapped or numpy_values):
            return "hf"
        return "airsplay"
    sample = ", ".join(sorted(keys)[:5])
    raise WeightsError(f"unrecognised checkpoint: no detectron2 BUTD keys (first keys: {sample})")
