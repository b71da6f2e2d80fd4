"""Ragged (CSR) HDF5 feature files: one writer, many readers, one image's rows per read.

Shape glossary:
    N   images in the file
    R   regions in the file, summed over images (10..100 per image by default)
    D   feature size (2048 for ResNet-101 C4)

Layout (format "1")::

    image_ids        (N,)   str    the caller's ids, unique in a file
    offsets          (N+1,) int64  image i owns rows offsets[i]:offsets[i+1]; offsets[0] = 0
    image_w, image_h (N,)   int32  original image size in pixels
    content_sha256   (N,)   str    sha256 of the image bytes ("" when unknown)
    namespace        (N,)   str    namespace of the alias (namespace, image_id) ("" when none)
    boxes            (R, 4) float32  x1, y1, x2, y2 in original-image pixels
    features         (R, D) float16 (default) or float32
    objects_id, attrs_id     (R,) int64
    objects_conf, attrs_conf (R,) float32
    root attributes: butd_format, model_version, config (JSON), objects_vocab and
    attributes_vocab (JSON lists), feature_dtype, feature_dim

Every dataset is chunked and resizable with no compression filter (fp16 without a filter reads
fastest; reference serving §3.2). A writer appends rows first and ``offsets`` last, then
flushes, so a crash loses at most the last ``append``: on reopen the row datasets are trimmed to
``offsets[-1]``. Features stored as float16 come back as float16 arrays (``FeatureRecord``
allows it); call ``.astype(np.float32)`` for an exact widening.

HDF5 refuses a second writer in another process but not in a forked child (reference serving
§0.8): open files after fork. ``FeatureFile`` opens read-only and never writes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import h5py
import numpy as np

from store.records import FeatureRecord

logger = logging.getLogger(__name__)

FORMAT = "1"
_STR = h5py.string_dtype("utf-8")
# Per-image datasets and their dtypes (length N; offsets is N + 1).
_IMAGE_SETS: dict[str, Any] = {
    "image_ids": _STR,
    "image_w": np.int32,
    "image_h": np.int32,
    "content_sha256": _STR,
    "namespace": _STR,
}
# Per-region datasets: name -> (dtype, trailing shape); features get (D,) at creation.
_ROW_SETS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "boxes": (np.float32, (4,)),
    "objects_id": (np.int64, ()),
    "objects_conf": (np.float32, ()),
    "attrs_id": (np.int64, ()),
    "attrs_conf": (np.float32, ()),
}
_KEY_SETS = ("content_sha256", "namespace")
_VOCABS = ("objects_vocab", "attributes_vocab")
_IMAGE_CHUNK = 4096  # rows per chunk of the per-image datasets (small scalars)
_FEATURE_CHUNK_BYTES = 256 * 1024  # a feature chunk holds ~256 KiB (64 rows of 2048 fp16)


class FeatureFileError(ValueError):
    """A feature file or a record that breaks the layout (version, dim, dtype, duplicate id)."""


def _attr_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Handle:
    """Close-once context manager around ``self._file``."""

    _file: h5py.File

    def close(self) -> None:
        """Close the HDF5 file (idempotent; the writer flushes on every append)."""
        if self._file.id.valid:
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FeatureFileWriter(_Handle):
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
    ) -> None:
        if feature_dtype not in ("float16", "float32"):
            raise FeatureFileError(f"feature_dtype must be float16 or float32; got {feature_dtype}")
        self.path = Path(path)
        self.model_version = model_version
        self.feature_dim = int(feature_dim)
        self.feature_dtype = np.dtype(feature_dtype)
        self.unique_ids = unique_ids
        self._file: h5py.File = h5py.File(self.path, "a")
        if "offsets" in self._file:
            self._check_existing()
            self._trim_partial_append()
        else:
            meta = {
                "config": config or {},
                "objects_vocab": list(objects_vocab),
                "attributes_vocab": list(attributes_vocab),
            }
            self._create(meta, size_hint)
        self._ids: set[str] | None = None

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
        for name, dtype in _IMAGE_SETS.items():
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
        for name, (dtype, tail) in _ROW_SETS.items():
            f.create_dataset(
                name, (0, *tail), dtype=dtype, maxshape=(None, *tail), chunks=(scalar_chunk, *tail)
            )
        f.flush()

    def _check_existing(self) -> None:
        f = self._file
        found = {
            "model_version": _attr_str(f.attrs.get("model_version", "")),
            "feature_dim": int(f["features"].shape[1]),
            "feature_dtype": f["features"].dtype.name,
        }
        wanted = {
            "model_version": self.model_version,
            "feature_dim": self.feature_dim,
            "feature_dtype": self.feature_dtype.name,
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
        for name in _IMAGE_SETS:
            if len(f[name]) != n:
                logger.warning("%s: trimming %s from %d to %d", self.path, name, len(f[name]), n)
                f[name].resize((n,))
        for name in ("features", *_ROW_SETS):
            if f[name].shape[0] != rows:
                logger.warning("%s: trimming %s to %d rows", self.path, name, rows)
                f[name].resize(rows, axis=0)

    def ids(self) -> set[str]:
        """The image ids already in the file (a resumed extraction skips them)."""
        if self._ids is None:
            self._ids = set(self._file["image_ids"].asstr()[:].tolist())
        return self._ids

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
            if not self.unique_ids:
                continue
            if rec.image_id in seen or rec.image_id in batch:
                raise FeatureFileError(f"image id {rec.image_id!r} is already in {self.path}")
            batch.add(rec.image_id)

    def append(self, records: Sequence[FeatureRecord]) -> None:
        """Append records (rows first, offsets last) and flush.

        Args:
            records: FeatureRecords of this file's model_version and D, ids new to the file.
                ``record.extra`` may hold "content_sha256" and "namespace" strings.

        Raises:
            FeatureFileError: wrong model_version or D, or an id already present.
        """
        records = list(records)
        if not records:
            return
        self._validate(records)
        f = self._file
        r0 = int(f["offsets"][-1])
        counts = np.array([rec.num_boxes for rec in records], dtype=np.int64)
        r1 = r0 + int(counts.sum())
        rows = {
            "features": np.concatenate([rec.features for rec in records]).astype(
                self.feature_dtype, copy=False
            ),
            **{name: np.concatenate([getattr(rec, name) for rec in records]) for name in _ROW_SETS},
        }
        for name, data in rows.items():
            f[name].resize(r1, axis=0)
            f[name][r0:r1] = data
        self._append_images(records)
        n0 = len(f["offsets"])
        f["offsets"].resize((n0 + len(records),))
        f["offsets"][n0:] = r0 + np.cumsum(counts)
        f.flush()
        if self._ids is not None:
            self._ids.update(rec.image_id for rec in records)

    def _append_images(self, records: Sequence[FeatureRecord]) -> None:
        f = self._file
        columns: dict[str, list[Any]] = {
            "image_ids": [rec.image_id for rec in records],
            "image_w": [rec.image_w for rec in records],
            "image_h": [rec.image_h for rec in records],
            "content_sha256": [str(rec.extra.get("content_sha256", "")) for rec in records],
            "namespace": [str(rec.extra.get("namespace", "")) for rec in records],
        }
        n0 = len(f["image_ids"])
        for name, values in columns.items():
            f[name].resize((n0 + len(records),))
            f[name][n0:] = np.array(values, dtype=object if f[name].dtype == _STR else None)


def write_feature_file(
    path: str | os.PathLike[str],
    records: Iterable[FeatureRecord],
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
            pending: list[FeatureRecord] = []
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


class FeatureFile(_Handle):
    """Read-only view of a ragged feature file; each ``get`` reads one image's rows.

    The small per-image arrays (offsets, sizes) are read once at open; the id -> position map
    is built on first use of an id lookup.

    Args:
        path: an existing feature file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = h5py.File(self.path, "r")
        f = self._file
        if "offsets" not in f:
            self._file.close()
            raise FeatureFileError(f"{self.path} is not a butd feature file (no offsets)")
        self._n = min(len(f["offsets"]) - 1, len(f["image_ids"]))
        self._offsets = f["offsets"][: self._n + 1].astype(np.int64)
        self._w = f["image_w"][: self._n]
        self._h = f["image_h"][: self._n]
        self._rows = {name: f[name] for name in ("features", *_ROW_SETS)}
        self._id_dset = f["image_ids"].asstr()
        self._key_cache: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        self._index: dict[str, int] | None = None
        self.model_version = _attr_str(f.attrs["model_version"])
        self.config: dict[str, Any] = json.loads(_attr_str(f.attrs.get("config", "{}")))
        vocabs = [json.loads(_attr_str(f.attrs.get(k, "[]"))) for k in _VOCABS]
        self.objects_vocab: list[str] = vocabs[0]
        self.attributes_vocab: list[str] = vocabs[1]

    @property
    def feature_dim(self) -> int:
        """D."""
        return int(self._rows["features"].shape[1])

    @property
    def feature_dtype(self) -> np.dtype[Any]:
        """Stored feature dtype (float16 or float32)."""
        dtype: np.dtype[Any] = np.dtype(self._rows["features"].dtype)
        return dtype

    def writer_meta(self) -> dict[str, Any]:
        """Keyword arguments that make a ``FeatureFileWriter`` of the same kind (no version)."""
        return {
            "config": self.config,
            "objects_vocab": self.objects_vocab,
            "attributes_vocab": self.attributes_vocab,
            "feature_dtype": self.feature_dtype.name,
            "feature_dim": self.feature_dim,
        }

    def _ids_index(self) -> dict[str, int]:
        if self._index is None:
            self._index = {}
            for i, image_id in enumerate(self.ids()):  # a repeated id (shards) maps to its first
                self._index.setdefault(image_id, i)
        return self._index

    def ids(self) -> list[str]:
        """Image ids in file order."""
        return list(self._id_dset[: self._n].tolist())

    def _keys(self) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
        """(sha, namespace) columns as compact bytes arrays, read once: a vlen string costs
        ~0.1 ms to read alone, the cache 64 B per image. Empty strings when absent."""
        if self._key_cache is None:
            f, n = self._file, self._n
            cols = [f[k][:n].astype("S") if k in f else np.full(n, b"", "S1") for k in _KEY_SETS]
            self._key_cache = (cols[0], cols[1])
        return self._key_cache

    def content_sha256(self) -> list[str]:
        """Per-image sha256 of the image bytes, in file order ("" when unknown)."""
        return [value.decode() for value in self._keys()[0]]

    def namespaces(self) -> list[str]:
        """Per-image alias namespace, in file order ("" when none)."""
        return [value.decode() for value in self._keys()[1]]

    def num_boxes(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """(N,) int64 region count per image."""
        counts: np.ndarray[Any, np.dtype[np.int64]] = np.diff(self._offsets)
        return counts

    def image_sizes(self) -> np.ndarray[Any, np.dtype[np.int32]]:
        """(N, 2) int32 original image width, height per image."""
        sizes: np.ndarray[Any, np.dtype[np.int32]] = np.stack([self._w, self._h], axis=1)
        return sizes.astype(np.int32)

    def __len__(self) -> int:
        return self._n

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and image_id in self._ids_index()

    def position(self, image_id: str) -> int:
        """Position of ``image_id`` in the file; KeyError when absent."""
        return self._ids_index()[image_id]

    def get(self, image_id: str) -> FeatureRecord:
        """The record of ``image_id`` (KeyError when absent); reads only its rows."""
        return self.read_row(self.position(image_id))

    def read_row(self, i: int) -> FeatureRecord:
        """The record at position ``i`` (0 <= i < N); features keep the stored dtype."""
        if not 0 <= i < self._n:
            raise IndexError(f"position {i} out of range for {self._n} images in {self.path}")
        r0, r1 = int(self._offsets[i]), int(self._offsets[i + 1])
        arrays = {name: dset[r0:r1] for name, dset in self._rows.items()}
        sha, namespace = self._keys()
        extra = {"content_sha256": sha[i].decode(), "namespace": namespace[i].decode()}
        return FeatureRecord(
            image_id=str(self._id_dset[i]),
            image_w=int(self._w[i]),
            image_h=int(self._h[i]),
            model_version=self.model_version,
            extra=extra,
            **arrays,
        )

    def __iter__(self) -> Iterator[FeatureRecord]:
        for i in range(self._n):
            yield self.read_row(i)
