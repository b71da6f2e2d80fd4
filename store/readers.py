"""Readers for the exported formats (``butd.store.exporters``), for round trips and for imports.

Each reader decodes exactly what the format holds: FeatureRecords where it has labels (dense
and ragged HDF5, LXMERT TSV, npz), plain dicts where it has none (the generate_tsv.py TSV).
Readers stream: one image at a time, never the whole file in memory.

Shape glossary: N regions of one image, D feature size, K fixed boxes (dense).
"""

from __future__ import annotations

import base64
import csv
import os
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from butd.store.exporters import LXMERT_FIELDS, TSV_FIELDS
from butd.store.records import FeatureRecord

_LABEL_NAMES = ("objects_id", "objects_conf", "attrs_id", "attrs_conf")


def _attr(h5: h5py.File, key: str, default: str = "") -> str:
    value = h5.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else str(value)


def read_imgid2idx(path: str | os.PathLike[str]) -> dict[Any, int]:
    """Load an ``*_imgid2idx.pkl`` side file: image id (int or str) -> row."""
    with Path(path).open("rb") as fh:
        mapping: dict[Any, int] = pickle.load(fh)
    return mapping


def read_h5_dense(path: str | os.PathLike[str]) -> Iterator[FeatureRecord]:
    """Records of a hengyuan-hu dense file written by ``export_h5_dense`` (padding removed).

    Yields:
        FeatureRecord with float32 features (N, D), N = ``num_boxes[i]`` <= K.
    """
    with h5py.File(path, "r") as h5:
        ids = h5["image_ids"].asstr()[:].tolist()
        counts, widths, heights = (h5[name][:] for name in ("num_boxes", "image_w", "image_h"))
        version = _attr(h5, "model_version")
        for i, image_id in enumerate(ids):
            m = int(counts[i])
            labels = {name: h5[name][i, :m] for name in _LABEL_NAMES}
            yield FeatureRecord(
                image_id=image_id,
                image_w=int(widths[i]),
                image_h=int(heights[i]),
                boxes=h5["image_bb"][i, :m],
                features=h5["image_features"][i, :m],
                model_version=version,
                **labels,
            )


def read_h5_ragged(path: str | os.PathLike[str]) -> Iterator[FeatureRecord]:
    """Records of a BAN ragged file written by ``export_h5_ragged`` (``pos_boxes`` slices)."""
    with h5py.File(path, "r") as h5:
        ids = h5["image_ids"].asstr()[:].tolist()
        pos, widths, heights = (h5[name][:] for name in ("pos_boxes", "image_w", "image_h"))
        version = _attr(h5, "model_version")
        for i, image_id in enumerate(ids):
            r0, r1 = int(pos[i, 0]), int(pos[i, 1])
            labels = {name: h5[name][r0:r1] for name in _LABEL_NAMES}
            yield FeatureRecord(
                image_id=image_id,
                image_w=int(widths[i]),
                image_h=int(heights[i]),
                boxes=h5["image_bb"][r0:r1],
                features=h5["image_features"][r0:r1],
                model_version=version,
                **labels,
            )


def _decode(text: str, dtype: Any, shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).reshape(shape)


def _tsv_rows(path: str | os.PathLike[str], fields: tuple[str, ...]) -> Iterator[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with Path(path).open(newline="") as fh:
        yield from csv.DictReader(fh, delimiter="\t", fieldnames=list(fields))


def read_tsv(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """Rows of a generate_tsv.py TSV, decoded as ``tools/read_tsv.py`` does.

    Yields:
        dict with image_id (str), image_w, image_h, num_boxes (int), boxes (N, 4) float32,
        features (N, D) float32. The format has no labels.
    """
    for row in _tsv_rows(path, TSV_FIELDS):
        n = int(row["num_boxes"])
        yield {
            "image_id": row["image_id"],
            "image_w": int(row["image_w"]),
            "image_h": int(row["image_h"]),
            "num_boxes": n,
            "boxes": _decode(row["boxes"], np.float32, (n, 4)),
            "features": _decode(row["features"], np.float32, (n, -1)),
        }


def read_lxmert_tsv(
    path: str | os.PathLike[str], *, model_version: str = ""
) -> Iterator[FeatureRecord]:
    """Records of an LXMERT obj36 TSV, decoded as ``lxmert/src/utils.py::load_obj_tsv`` does.

    Args:
        model_version: the format does not carry one; stamped on every record.
    """
    for row in _tsv_rows(path, LXMERT_FIELDS):
        n = int(row["num_boxes"])
        yield FeatureRecord(
            image_id=row["img_id"],
            image_w=int(row["img_w"]),
            image_h=int(row["img_h"]),
            boxes=_decode(row["boxes"], np.float32, (n, 4)),
            features=_decode(row["features"], np.float32, (n, -1)),
            objects_id=_decode(row["objects_id"], np.int64, (n,)),
            objects_conf=_decode(row["objects_conf"], np.float32, (n,)),
            attrs_id=_decode(row["attrs_id"], np.int64, (n,)),
            attrs_conf=_decode(row["attrs_conf"], np.float32, (n,)),
            model_version=model_version,
        )


def read_npz(path: str | os.PathLike[str], *, model_version: str = "") -> FeatureRecord:
    """One MILVLG npz (``allow_pickle=True`` for its ``info`` dict) as a FeatureRecord."""
    with np.load(path, allow_pickle=True) as data:
        info = data["info"].item()
        return FeatureRecord(
            image_id=str(info["image_id"]),
            image_w=int(data["image_w"]),
            image_h=int(data["image_h"]),
            boxes=np.asarray(data["bbox"], dtype=np.float32),
            features=np.asarray(data["x"]),
            objects_id=np.asarray(info["objects_id"], dtype=np.int64),
            objects_conf=np.asarray(info["objects_conf"], dtype=np.float32),
            attrs_id=np.asarray(info["attrs_id"], dtype=np.int64),
            attrs_conf=np.asarray(info["attrs_conf"], dtype=np.float32),
            model_version=model_version,
        )


def read_npz_dir(directory: str | os.PathLike[str]) -> Iterator[FeatureRecord]:
    """Every ``*.npz`` in ``directory``, in file-name order."""
    for path in sorted(Path(directory).glob("*.npz")):
        yield read_npz(path)
