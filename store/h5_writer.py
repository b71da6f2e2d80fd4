"""Writing ragged feature files: ``FeatureFileWriter`` (create or resume) and the atomic
``write_feature_file``. The layout they write is defined in ``butd.store.h5``.

Shape glossary: N images, R regions summed over images, D feature size (as in ``butd.store.h5``).

Chunking: a feature chunk holds about 256 KiB; a file written in one go (a shard, ``size_hint``)
caps its chunks at its own size, so a small file stays small.

Crash behaviour: ``append`` writes the rows first, then the per-image datasets, then
``offsets``, and flushes, so a crash loses at most the last ``append``: on reopen the datasets
are trimmed to ``offsets[-1]``. HDF5 is not crash-safe while a file is open, which is why the
service writes sealed shards instead (``butd.store.shards``: a temp name, then ``os.replace``).

One writer per file: HDF5 refuses a second writer in another process but not in a forked child
(reference serving §0.8), so open a writer after fork.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from butd.store.h5 import (
    FORMAT,
    IMAGE_SETS,
    ROW_SETS,
    STR_DTYPE,
    FeatureFileError,
    FileHandle,
    attr_str,
)
from butd.store.image_ids import POLICY_ATTR, ImageIdError, merge_metadata
from butd.store.records import FeatureRecord, StoredRow, as_row

logger = logging.getLogger(__name__)

_IMAGE_CHUNK = 4096  # rows per chunk of the per-image datasets (small scalars)
_FEATURE_CHUNK_BYTES = 256 * 1024  # a feature chunk holds ~256 KiB (64 rows of 2048 fp16)


class FeatureFileWriter(FileHandle):
    """Append FeatureRecords to a ragged HDF5 file; creates it or resumes an existing one.

    Args:
        path: the .h5 file; opened with mode "a" (created when missing).
        model_version: every record must carry this version.
        config: the extraction configuration, stored as JSON.
        objects_vocab: the 1600 object names (index = ``objects_id``).
        attributes_vocab: the 400 attribute names (index = ``attrs_id``).
        feature_dtype: "float16" (default, max rel. error 5e-4) or "float32".
        feature_dim: D; every record must have ``features.shape[1] == D``.
        unique_ids: refuse an image id already in the file (True); shard files, whose rows are
            keyed by content and may repeat an id across namespaces, pass False.
        size_hint: (images, regions) of a file written once (a shard): chunks are capped at
            that size so a small file stays small. None for files that grow.
        grid_size: G > 0 adds the ``grids`` dataset (N, G, G, D); every record must then carry
            a (G, G, D) grid, and with 0 none may.
        id_policy: how the ids were made (``butd.store.image_ids.IdPolicy.metadata``), recorded as
            the root attribute ``image_id_policy``; merged into an existing file's record.

    Raises:
        FeatureFileError: an existing file with another model_version, D or feature dtype.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        model_version: str,
        config: dict[str, Any] | None = None,
        objects_vocab: Sequence[str] = (),
        attributes_vocab: Sequence[str] = (),
        feature_dtype: str = "float16",
        feature_dim: int,
        unique_ids: bool = True,
        size_hint: tuple[int, int] | None = None,
        grid_size: int = 0,
        id_policy: dict[str, Any] | None = None,
    ) -> None:
        if feature_dtype not in ("float16", "float32"):
            raise FeatureFileError(f"feature_dtype must be float16 or float32; got {feature_dtype}")
        self.path = Path(path)
        self.model_version = model_version
        self.feature_dim = int(feature_dim)
        self.feature_dtype = np.dtype(feature_dtype)
        self.unique_ids = unique_ids
        self.grid_size = int(grid_size)
        self._file: h5py.File = h5py.File(self.path, "a")
        if "offsets" in self._file:
            self._check_existing()
            self._trim_partial_append()
            if id_policy is not None:
                self._record_policy(id_policy)
        else:
            meta = {
                "config": config or {},
                "objects_vocab": list(objects_vocab),
                "attributes_vocab": list(attributes_vocab),
            }
            self._create(meta, size_hint)
            if id_policy is not None:
                self._file.attrs[POLICY_ATTR] = json.dumps(id_policy)
        self._ids: set[str] | None = None

    def _record_policy(self, policy: dict[str, Any]) -> None:
        """Merge ``policy`` into the file's recorded one (a resume must use the same rule)."""
        old = json.loads(attr_str(self._file.attrs.get(POLICY_ATTR, '{"rule": "path"}')))
        try:
            merged = merge_metadata(old, policy)
        except ImageIdError as exc:
            self._file.close()
            raise FeatureFileError(f"{self.path}: {exc}") from exc
        self._file.attrs[POLICY_ATTR] = json.dumps(merged)

    def _create(self, meta: dict[str, Any], size_hint: tuple[int, int] | None) -> None:
        f = self._file
        itemsize = self.feature_dtype.itemsize
        row_chunk = max(1, _FEATURE_CHUNK_BYTES // max(1, self.feature_dim * itemsize))
        image_chunk = scalar_chunk = _IMAGE_CHUNK
        if size_hint is not None:  # a small sealed file: chunks no larger than its data
            image_chunk = max(1, min(image_chunk, size_hint[0] + 1))
            scalar_chunk = max(1, min(scalar_chunk, size_hint[1]))
            row_chunk = max(1, min(row_chunk, size_hint[1]))
        f.attrs["butd_format"] = FORMAT
        f.attrs["model_version"] = self.model_version
        f.attrs["feature_dtype"] = self.feature_dtype.name
        f.attrs["feature_dim"] = self.feature_dim
        for key, value in meta.items():
            f.attrs[key] = json.dumps(value)
        for name, dtype in IMAGE_SETS.items():
            f.create_dataset(name, (0,), dtype=dtype, maxshape=(None,), chunks=(image_chunk,))
        f.create_dataset(
            "offsets", data=np.zeros(1, np.int64), maxshape=(None,), chunks=(image_chunk,)
        )
        f.create_dataset(
            "features",
            (0, self.feature_dim),
            dtype=self.feature_dtype,
            maxshape=(None, self.feature_dim),
            chunks=(row_chunk, self.feature_dim),
        )
        for name, (dtype, tail) in ROW_SETS.items():
            f.create_dataset(
                name, (0, *tail), dtype=dtype, maxshape=(None, *tail), chunks=(scalar_chunk, *tail)
            )
        f.attrs["grid_size"] = self.grid_size
        if self.grid_size:
            cell = (self.grid_size, self.grid_size, self.feature_dim)
            f.create_dataset(
                "grids", (0, *cell), dtype=self.feature_dtype, maxshape=(None, *cell),
                chunks=(1, *cell),
            )  # fmt: skip
        f.flush()

    def _check_existing(self) -> None:
        f = self._file
        found = {
            "model_version": attr_str(f.attrs.get("model_version", "")),
            "feature_dim": int(f["features"].shape[1]),
            "feature_dtype": f["features"].dtype.name,
            "grid_size": int(f["grids"].shape[1]) if "grids" in f else 0,
        }
        wanted = {
            "model_version": self.model_version,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype.name,
            "grid_size": self.grid_size,
        }
        for key, value in wanted.items():
            if found[key] != value:
                self._file.close()
                raise FeatureFileError(
                    f"{self.path} has {key}={found[key]!r}; cannot append {key}={value!r}"
                )

    def _trim_partial_append(self) -> None:
        """Drop rows and images written after the last complete ``offsets`` update."""
        f = self._file
        n = len(f["offsets"]) - 1
        rows = int(f["offsets"][n])
        for name in (*IMAGE_SETS, *(("grids",) if "grids" in f else ())):
            if len(f[name]) != n:
                logger.warning("%s: trimming %s from %d to %d", self.path, name, len(f[name]), n)
                f[name].resize(n, axis=0)
        for name in ("features", *ROW_SETS):
            if f[name].shape[0] != rows:
                logger.warning("%s: trimming %s to %d rows", self.path, name, rows)
                f[name].resize(rows, axis=0)

    def ids(self) -> set[str]:
        """The image ids already in the file (a resumed extraction skips them)."""
        if self._ids is None:
            self._ids = set(self._file["image_ids"].asstr()[:].tolist())
        return self._ids

    def stored_sha256(self) -> dict[str, str]:
        """Image id -> sha256 of the image bytes it was extracted from ("" when not recorded);
        a resumed extraction skips an id only when its file still hashes the same."""
        f = self._file
        ids = f["image_ids"].asstr()[:].tolist()
        if "content_sha256" not in f:
            return dict.fromkeys(ids, "")
        return dict(zip(ids, f["content_sha256"].asstr()[:].tolist(), strict=True))

    def _validate(self, records: Sequence[FeatureRecord]) -> None:
        seen = self.ids() if self.unique_ids else set()
        batch: set[str] = set()
        for rec in records:
            if rec.model_version != self.model_version:
                raise FeatureFileError(
                    f"record {rec.image_id!r} has model_version {rec.model_version!r}; "
                    f"file {self.path} holds {self.model_version!r}"
                )
            if rec.feature_dim != self.feature_dim:
                raise FeatureFileError(
                    f"record {rec.image_id!r} has D={rec.feature_dim}; file holds D="
                    f"{self.feature_dim}"
                )
            self._validate_grid(rec)
            if not self.unique_ids:
                continue
            if rec.image_id in seen or rec.image_id in batch:
                raise FeatureFileError(f"image id {rec.image_id!r} is already in {self.path}")
            batch.add(rec.image_id)

    def _validate_grid(self, rec: FeatureRecord) -> None:
        g = self.grid_size
        found = None if rec.grid is None else tuple(rec.grid.shape)
        wanted = (g, g, self.feature_dim) if g else None
        if found != wanted:
            raise FeatureFileError(
                f"record {rec.image_id!r} has grid {found}; file {self.path} holds grids {wanted}"
            )

    def append(self, items: Sequence[FeatureRecord | StoredRow]) -> None:
        """Append records (rows first, offsets last) and flush.

        Args:
            items: records of this file's model_version and D, ids new to the file; a
                ``StoredRow`` also stores its content sha256 and namespace ("" for a record).

        Raises:
            FeatureFileError: wrong model_version or D, or an id already present.
        """
        keyed = [as_row(item) for item in items]
        if not keyed:
            return
        records = [row.record for row in keyed]
        self._validate(records)
        f = self._file
        r0 = int(f["offsets"][-1])
        counts = np.array([rec.num_boxes for rec in records], dtype=np.int64)
        r1 = r0 + int(counts.sum())
        rows = {
            "features": np.concatenate([rec.features for rec in records]).astype(
                self.feature_dtype, copy=False
            ),
            **{name: np.concatenate([getattr(rec, name) for rec in records]) for name in ROW_SETS},
        }
        for name, data in rows.items():
            f[name].resize(r1, axis=0)
            f[name][r0:r1] = data
        self._append_images(keyed)
        n0 = len(f["offsets"])
        f["offsets"].resize((n0 + len(records),))
        f["offsets"][n0:] = r0 + np.cumsum(counts)
        f.flush()
        if self._ids is not None:
            self._ids.update(rec.image_id for rec in records)

    def _append_images(self, rows: Sequence[StoredRow]) -> None:
        f = self._file
        records = [row.record for row in rows]
        columns: dict[str, list[Any]] = {
            "image_ids": [rec.image_id for rec in records],
            "image_w": [rec.image_w for rec in records],
            "image_h": [rec.image_h for rec in records],
            "content_sha256": [row.content_sha256 for row in rows],
            "namespace": [row.namespace for row in rows],
        }
        n0 = len(f["image_ids"])
        for name, values in columns.items():
            f[name].resize((n0 + len(records),))
            f[name][n0:] = np.array(values, dtype=object if f[name].dtype == STR_DTYPE else None)
        if self.grid_size:
            grids = np.stack([rec.grid for rec in records if rec.grid is not None])
            f["grids"].resize(n0 + len(records), axis=0)
            f["grids"][n0:] = grids.astype(self.feature_dtype, copy=False)


def write_feature_file(
    path: str | os.PathLike[str],
    records: Iterable[FeatureRecord | StoredRow],
    *,
    batch: int = 256,
    **meta: Any,
) -> int:
    """Write a whole feature file atomically: a temp name in the same dir, then ``os.replace``.

    Args:
        path: destination; replaced atomically (readers see the old file or the new one).
        records: streamed, ``batch`` at a time, so memory stays bounded.
        batch: records per append.
        **meta: FeatureFileWriter keyword arguments (model_version, feature_dim, config, ...).

    Returns:
        The number of images written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    count = 0
    try:
        with FeatureFileWriter(tmp, **meta) as writer:
            pending: list[FeatureRecord | StoredRow] = []
            for rec in records:
                pending.append(rec)
                if len(pending) >= batch:
                    writer.append(pending)
                    count += len(pending)
                    pending = []
            writer.append(pending)
            count += len(pending)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return count
