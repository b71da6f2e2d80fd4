"""Export a ragged feature file to the formats existing caption / VQA code reads.

Shape glossary:
    N   images;  R   regions summed over images;  K   fixed boxes per image (dense);
    D   feature size

Formats (reference heads §1, butd §1.7, §3.2):

* ``h5-dense`` (hengyuan-hu ``train36.hdf5``): ``image_features (N,K,D)``, ``image_bb (N,K,4)``,
  ``spatial_features (N,K,6)`` = x1/W, y1/H, x2/W, y2/H, w/W, h/H, all float32, plus
  ``num_boxes (N,)`` int32 (real boxes; rows past it are zero padding; ``objects_id`` /
  ``attrs_id`` padding is -1), ``image_ids (N,)``, ``image_w``/``image_h``, the labels
  ``(N,K)`` and ``<stem>_imgid2idx.pkl``. An image with more than K boxes keeps its K most
  confident (``objects_conf``, ties to the lower index), in their original order; the count of
  truncated images is logged and stored as the root attribute ``truncated_images``.
* ``h5-ragged`` (BAN): ``image_features (R,D)``, ``image_bb (R,4)``, ``spatial_features (R,6)``,
  ``pos_boxes (N,2)`` (start, end) int32 (int64 past 2**31 rows), labels (R,), per-image
  datasets as above, and ``<stem>_imgid2idx.pkl``.
* ``tsv`` (generate_tsv.py): tab-separated, no header, ``image_id, image_w, image_h,
  num_boxes, boxes, features`` (base64 float32; w before h). No labels.
* ``lxmert-tsv``: ``img_id, img_h, img_w, objects_id, objects_conf, attrs_id, attrs_conf,
  num_boxes, boxes, features`` (base64; ids int64, the rest float32; h before w).
* ``npz`` / ``npz-mcan``: one file per image, ``x`` as (N, D) (MILVLG's writer) or (D, N) (what
  MCAN / OpenVQA load); see ``butd.store.export_npz``.
* ``h5-grid`` (``butd.store.grid_export``): the grid features of a ``--grid-size`` extraction,
  ``<image_id>_grids (G*G, D)`` per image, as grid-feature captioning / VQA code reads them.

Ids are written the way each consumer looks them up (``butd.store.export_common.CONSUMERS``,
``butd.store.image_ids``): integers for the generate_tsv readers and the ``*_imgid2idx.pkl`` (pickle
protocol 2, readable by Python 2.7), the file stem for LXMERT and MILVLG; ``ids="stored"`` keeps
the stored ids. The ``image_ids`` dataset of the HDF5 exports keeps the stored ids, in row
order. Features leave as float32 (fp16 widens exactly).
Every exporter streams one image at a time from a ``FeatureFile`` and writes under a temp name
that is renamed into place when complete.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from butd.store.export_common import Progress, atomic, export_keys
from butd.store.export_npz import export_npz, export_npz_mcan
from butd.store.grid_export import export_h5_grid
from butd.store.h5 import FeatureFile
from butd.store.records import FeatureRecord

logger = logging.getLogger(__name__)

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
LXMERT_FIELDS = (
    "img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf",
    "num_boxes", "boxes", "features",
)  # fmt: skip
_STR = h5py.string_dtype("utf-8")
_LABELS = {"objects_id": np.int64, "objects_conf": np.float32, "attrs_id": np.int64,
           "attrs_conf": np.float32}  # fmt: skip


def imgid2idx_path(out: str | os.PathLike[str]) -> Path:
    """``data/train36.hdf5`` -> ``data/train36_imgid2idx.pkl`` (the original side file)."""
    out = Path(out)
    return out.with_name(f"{out.stem}_imgid2idx.pkl")


def imgid2idx(keys: Sequence[Any]) -> dict[Any, int]:
    """consumer key (``butd.store.image_ids.consumer_keys``) -> row."""
    return {key: row for row, key in enumerate(keys)}


PICKLE_PROTOCOL = 2
"""Python 2.7 (bottom-up-attention-vqa's own environment) reads protocols 0-2 only."""


def _write_imgid2idx(out: Path, keys: Sequence[Any]) -> None:
    with atomic(imgid2idx_path(out)) as tmp, tmp.open("wb") as fh:
        pickle.dump(imgid2idx(keys), fh, protocol=PICKLE_PROTOCOL)


def select_top_k(rec: FeatureRecord, k: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Indices of the ``k`` most confident regions (``objects_conf``), in original order.

    Ties go to the lower index (stable sort). Returns all indices when ``N <= k``.
    """
    n = rec.num_boxes
    if n <= k:
        return np.arange(n, dtype=np.int64)
    order = np.argsort(-rec.objects_conf, kind="stable")[:k]
    return np.sort(order).astype(np.int64)


def _per_image_sets(h5: h5py.File, ff: FeatureFile) -> None:
    ids = ff.ids()
    h5.create_dataset("image_ids", data=np.array(ids, dtype=object), dtype=_STR)
    h5.attrs["model_version"] = ff.model_version
    for key in ("objects_vocab", "attributes_vocab"):
        h5.attrs[key] = json.dumps(getattr(ff, key))


Arrays = dict[str, np.ndarray[Any, Any]]
_BLOCK = 256  # images buffered per HDF5 write (few large writes instead of many small ones)


def _stream(
    ff: FeatureFile,
    dsets: dict[str, h5py.Dataset],
    arrays_of: Callable[[FeatureRecord], Arrays],
    join: Callable[[list[np.ndarray[Any, Any]]], np.ndarray[Any, Any]],
    progress: Progress | None,
) -> None:
    """Write ``arrays_of(rec)`` for every record, ``_BLOCK`` images per write along axis 0."""
    pos, buf = 0, []
    for i, rec in enumerate(ff):
        buf.append(arrays_of(rec))
        if len(buf) == _BLOCK or i == len(ff) - 1:
            for name, dset in dsets.items():
                data = join([item[name] for item in buf])
                dset[pos : pos + len(data)] = data
            pos += len(data)
            if progress is not None:
                progress(len(buf))
            buf = []


def _sizes(h5: h5py.File, ff: FeatureFile, **extra: np.ndarray[Any, Any]) -> None:
    sizes = ff.image_sizes()
    h5.create_dataset("image_w", data=sizes[:, 0])
    h5.create_dataset("image_h", data=sizes[:, 1])
    for name, data in extra.items():
        h5.create_dataset(name, data=data)


def _dense_arrays(rec: FeatureRecord, k: int) -> Arrays:
    """One image's (K, ...) arrays: top-K regions, zero padded (ids padded with -1)."""
    keep = select_top_k(rec, k)
    m = len(keep)
    out: Arrays = {
        "image_features": np.zeros((k, rec.feature_dim), np.float32),
        "image_bb": np.zeros((k, 4), np.float32),
        "spatial_features": np.zeros((k, 6), np.float32),
        **{name: np.full(k, -1 if dt == np.int64 else 0, dt) for name, dt in _LABELS.items()},
    }
    out["image_features"][:m] = rec.features[keep]
    out["image_bb"][:m] = rec.boxes[keep]
    out["spatial_features"][:m] = rec.spatial_features()[keep]
    for name in _LABELS:
        out[name][:m] = getattr(rec, name)[keep]
    return out


class PaddingError(ValueError):
    """``h5-dense`` of images with fewer than K regions, without ``allow_padding``."""


def _check_padding(ff: FeatureFile, counts: np.ndarray[Any, Any], k: int, allow: bool) -> int:
    padded = int((counts < k).sum())
    if padded and not allow:
        raise PaddingError(
            f"h5-dense: {padded} of {len(ff)} images have fewer than K={k} regions (fewest: "
            f"{int(counts.min())}); bottom-up-attention-vqa has no mask and would read the zero "
            f"padding as regions. Extract fixed K instead (`butd extract --min-boxes {k} "
            f"--max-boxes {k}`), use h5-ragged, or pass --allow-padding"
        )
    if padded:
        logger.warning("h5-dense: %d of %d images padded to K=%d with zero rows (num_boxes "
                       "says how many are real)", padded, len(ff), k)  # fmt: skip
    return padded


def export_h5_dense(
    ff: FeatureFile,
    out: str | os.PathLike[str],
    *,
    k: int = 36,
    allow_padding: bool = False,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write the hengyuan-hu fixed-K HDF5 file and its ``_imgid2idx.pkl``; returns N.

    Raises:
        PaddingError: an image has fewer than K regions and ``allow_padding`` is False.
        ImageIdError: a stored id that is not a COCO / integer id (``ids="consumer"``).
    """
    out, n, d = Path(out), len(ff), ff.feature_dim
    counts = ff.num_boxes()
    keys = export_keys(ff, "h5-dense", ids)
    padded = _check_padding(ff, counts, k, allow_padding)
    truncated = int((counts > k).sum())
    with atomic(out) as tmp, h5py.File(tmp, "w") as h5:
        _per_image_sets(h5, ff)
        _sizes(h5, ff, num_boxes=np.minimum(counts, k).astype(np.int32))
        tails = {"image_features": (k, d), "image_bb": (k, 4), "spatial_features": (k, 6)}
        dsets = {name: h5.create_dataset(name, (n, *t), np.float32) for name, t in tails.items()}
        for name, dt in _LABELS.items():
            dsets[name] = h5.create_dataset(name, (n, k), dt)
        _stream(ff, dsets, lambda rec: _dense_arrays(rec, k), np.stack, progress)
        h5.attrs["k"] = k
        h5.attrs["truncated_images"] = truncated
        h5.attrs["padded_images"] = padded
    if truncated:
        logger.warning("%s: %d of %d images had more than K=%d boxes; kept the top %d by "
                       "objects_conf", out, truncated, n, k, k)  # fmt: skip
    _write_imgid2idx(out, keys)
    return n


def _ragged_arrays(rec: FeatureRecord) -> Arrays:
    return {
        "image_features": rec.features.astype(np.float32),
        "image_bb": rec.boxes,
        "spatial_features": rec.spatial_features(),
        **{name: getattr(rec, name) for name in _LABELS},
    }


def export_h5_ragged(
    ff: FeatureFile,
    out: str | os.PathLike[str],
    *,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write the BAN ragged HDF5 file (``pos_boxes``) and its ``_imgid2idx.pkl``; returns N."""
    out, n, d = Path(out), len(ff), ff.feature_dim
    keys = export_keys(ff, "h5-ragged", ids)
    counts = ff.num_boxes()
    ends = np.cumsum(counts)
    r = int(ends[-1]) if n else 0
    pos = np.stack([ends - counts, ends], axis=1).astype(np.int32 if r < 2**31 else np.int64)
    with atomic(out) as tmp, h5py.File(tmp, "w") as h5:
        _per_image_sets(h5, ff)
        _sizes(h5, ff, pos_boxes=pos)
        tails = {"image_features": (d,), "image_bb": (4,), "spatial_features": (6,)}
        dsets = {name: h5.create_dataset(name, (r, *t), np.float32) for name, t in tails.items()}
        for name, dt in _LABELS.items():
            dsets[name] = h5.create_dataset(name, (r,), dt)
        _stream(ff, dsets, _ragged_arrays, np.concatenate, progress)
    _write_imgid2idx(out, keys)
    return n


def b64(array: np.ndarray[Any, Any], dtype: Any) -> str:
    """Base64 text of ``array`` as contiguous ``dtype`` bytes (the TSV encoding)."""
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def tsv_row(rec: FeatureRecord, image_id: Any = None) -> list[str]:
    """One generate_tsv.py row: image_id, image_w, image_h, num_boxes, boxes, features."""
    key = rec.image_id if image_id is None else image_id
    return [str(key), str(rec.image_w), str(rec.image_h), str(rec.num_boxes),
            b64(rec.boxes, np.float32), b64(rec.features, np.float32)]  # fmt: skip


def lxmert_row(rec: FeatureRecord, image_id: Any = None) -> list[str]:
    """One LXMERT obj36 row (h before w)."""
    key = rec.image_id if image_id is None else image_id
    return [
        str(key), str(rec.image_h), str(rec.image_w),
        b64(rec.objects_id, np.int64), b64(rec.objects_conf, np.float32),
        b64(rec.attrs_id, np.int64), b64(rec.attrs_conf, np.float32),
        str(rec.num_boxes), b64(rec.boxes, np.float32), b64(rec.features, np.float32),
    ]  # fmt: skip


def _export_tsv_rows(
    ff: FeatureFile,
    out: Path,
    row: Callable[[FeatureRecord, Any], list[str]],
    keys: Sequence[Any],
    progress: Progress | None,
) -> int:
    n = 0
    with atomic(out) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        for key, rec in zip(keys, ff, strict=True):
            writer.writerow(row(rec, key))
            n += 1
            if progress is not None:
                progress(1)
    return n


def export_tsv(
    ff: FeatureFile,
    out: str | os.PathLike[str],
    *,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write the generate_tsv.py TSV (no labels) under integer ids; returns N.

    Raises:
        ImageIdError: a stored id with no integer (the readers call ``int(image_id)``).
    """
    keys = export_keys(ff, "tsv", ids)
    return _export_tsv_rows(ff, Path(out), tsv_row, keys, progress)


def export_lxmert_tsv(
    ff: FeatureFile,
    out: str | os.PathLike[str],
    *,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write the LXMERT obj36-style TSV with labels under file-stem ids; returns N."""
    keys = export_keys(ff, "lxmert-tsv", ids)
    return _export_tsv_rows(ff, Path(out), lxmert_row, keys, progress)


EXPORTERS: dict[str, Callable[..., int]] = {
    "h5-dense": export_h5_dense,
    "h5-ragged": export_h5_ragged,
    "tsv": export_tsv,
    "lxmert-tsv": export_lxmert_tsv,
    "npz": export_npz,
    "npz-mcan": export_npz_mcan,
    "h5-grid": export_h5_grid,
}
