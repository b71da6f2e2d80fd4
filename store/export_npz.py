"""One ``.npz`` per image, in two layouts.

Shape glossary: N regions of one image, D feature size.

* ``npz`` (the MILVLG bottom-up-attention.pytorch **writer** layout): ``x (N, D)`` float32,
  ``bbox (N, 4)``, ``num_bbox``, ``image_h``, ``image_w``, ``info`` (a pickled dict with the
  labels: ``np.load(..., allow_pickle=True)``). The file is named by the image's stem as that
  extractor names it (``COCO_val2014_000000000042.npz``), percent-encoded (``/`` -> ``%2F``).
* ``npz-mcan`` (what MCAN-vqa / OpenVQA **load**): the same fields with ``x`` as ``(D, N)``, as
  in the feature files they distribute (their loader calls ``x.transpose((1, 0))``). The file
  name carries the integer id where their loader parses it
  (``int(name.split('_')[-1].split('.')[0])``): ``COCO_val2014_000000000042.jpg.npz`` when the
  COCO split is known, else ``42.npz``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from butd.store.export_common import Progress, atomic, export_keys
from butd.store.h5 import FeatureFile
from butd.store.image_ids import coco_parts
from butd.store.records import FeatureRecord


def npz_name(key: str) -> str:
    """File name of an image's npz: percent-encoded key (no path separators) + ".npz"."""
    if not key:
        raise ValueError("an empty image id has no npz file name")
    return quote(key, safe="") + ".npz"


def npz_fields(rec: FeatureRecord, image_id: str | None = None) -> dict[str, Any]:
    """The MILVLG ``save_roi_features`` fields of one record (``x`` as (N, D)).

    Args:
        image_id: the id written into ``info`` (default: the stored id).
    """
    info = {
        "image_id": rec.image_id if image_id is None else image_id,
        "image_h": rec.image_h,
        "image_w": rec.image_w,
        "num_boxes": rec.num_boxes,
        "objects_id": rec.objects_id,
        "objects_conf": rec.objects_conf,
        "attrs_id": rec.attrs_id,
        "attrs_conf": rec.attrs_conf,
    }
    return {
        "x": rec.features.astype(np.float32),
        "bbox": rec.boxes,
        "num_bbox": rec.num_boxes,
        "image_h": rec.image_h,
        "image_w": rec.image_w,
        "info": info,
    }


def mcan_name(stored_id: str, key: int, policy: dict[str, Any]) -> str:
    """``COCO_{split}_{012d}.jpg.npz`` when the split is known (from the id or the recorded
    policy's single split), else ``{key}.npz``; both parse to ``key`` in MCAN's loader."""
    parts = coco_parts(stored_id)
    splits = policy.get("coco_splits", [])
    split = parts[0] if parts is not None and parts[0] else (splits[0] if len(splits) == 1 else "")
    return f"COCO_{split}_{key:012d}.jpg.npz" if split else f"{key}.npz"


def _write_all(
    ff: FeatureFile,
    out_dir: Path,
    name_of: Callable[[int, FeatureRecord], str],
    fields_of: Callable[[int, FeatureRecord], dict[str, Any]],
    compress: bool,
    progress: Progress | None,
) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    save = np.savez_compressed if compress else np.savez
    n = 0
    for i, rec in enumerate(ff):
        with atomic(out_dir / name_of(i, rec)) as tmp, tmp.open("wb") as fh:
            save(fh, **fields_of(i, rec))
        n += 1
        if progress is not None:
            progress(1)
    return n


def export_npz(
    ff: FeatureFile,
    out_dir: str | os.PathLike[str],
    *,
    compress: bool = True,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write one MILVLG-writer npz per image (``x`` (N, D)) into ``out_dir``; returns N.

    Args:
        compress: ``np.savez_compressed`` as MILVLG does (True) or plain ``np.savez``.
        ids: ``consumer`` names files and ``info["image_id"]`` by stem; ``stored`` by the id.
    """
    keys = export_keys(ff, "npz", ids)
    return _write_all(
        ff,
        Path(out_dir),
        lambda i, rec: npz_name(str(keys[i])),
        lambda i, rec: npz_fields(rec, str(keys[i])),
        compress,
        progress,
    )


def export_npz_mcan(
    ff: FeatureFile,
    out_dir: str | os.PathLike[str],
    *,
    compress: bool = True,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write one MCAN / OpenVQA npz per image (``x`` (D, N)) into ``out_dir``; returns N.

    Raises:
        ImageIdError: a stored id with no integer (their loader parses one from the name).
    """
    keys = export_keys(ff, "npz-mcan", ids)
    stored = ids == "stored"

    def fields(i: int, rec: FeatureRecord) -> dict[str, Any]:
        out = npz_fields(rec, str(keys[i]))
        out["x"] = np.ascontiguousarray(out["x"].T)  # (D, N)
        return out

    def name(i: int, rec: FeatureRecord) -> str:
        return npz_name(str(keys[i])) if stored else mcan_name(rec.image_id, keys[i], ff.id_policy)

    return _write_all(ff, Path(out_dir), name, fields, compress, progress)
