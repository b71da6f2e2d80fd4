"""Ragged (CSR) HDF5 feature files: the layout, and ``FeatureFile``, which reads them.

The writer (``FeatureFileWriter``, ``write_feature_file``) is in ``butd.store.h5_writer``; both
build on the dataset tables defined here, so this module is the one definition of the format.

Shape glossary:
    N   images in the file
    R   regions in the file, summed over images (10..100 per image by default)
    D   feature size (2048 for ResNet-101 C4)
    G   grid side of the optional grid features

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
    grids            (N, G, G, D) optional, as features' dtype: grid features of each image
                     (present only in files of a grid_size > 0 extraction; rows follow image_ids)
    root attributes: butd_format, model_version, config (JSON), objects_vocab and
    attributes_vocab (JSON lists), feature_dtype, feature_dim, grid_size (0 when no grids),
    image_id_policy (JSON: the rule that made the ids, ``butd.store.image_ids``; absent in files
    written before it existed)

Every dataset is chunked and resizable with no compression filter (fp16 without a filter reads
fastest; reference serving §3.2). A reader sees only images whose ``offsets`` entry was written,
so rows past ``offsets[-1]`` (a crashed append) are ignored. Features stored as float16 come
back as float16 arrays (``FeatureRecord`` allows it); call ``.astype(np.float32)`` for an exact
widening.

HDF5 refuses a second writer in another process but not in a forked child (reference serving
§0.8): open files after fork. ``FeatureFile`` opens read-only and never writes.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Self

import h5py
import numpy as np

from butd.store.records import FeatureRecord, StoredRow

FORMAT = "1"
STR_DTYPE = h5py.string_dtype("utf-8")
# Per-image datasets and their dtypes (length N; offsets is N + 1).
IMAGE_SETS: dict[str, Any] = {
    "image_ids": STR_DTYPE,
    "image_w": np.int32,
    "image_h": np.int32,
    "content_sha256": STR_DTYPE,
    "namespace": STR_DTYPE,
}
# Per-region datasets: name -> (dtype, trailing shape); features get (D,) at creation.
ROW_SETS: dict[str, tuple[Any, tuple[int, ...]]] = {
    "boxes": (np.float32, (4,)),
    "objects_id": (np.int64, ()),
    "objects_conf": (np.float32, ()),
    "attrs_id": (np.int64, ()),
    "attrs_conf": (np.float32, ()),
}
_KEY_SETS = ("content_sha256", "namespace")
_VOCABS = ("objects_vocab", "attributes_vocab")


class FeatureFileError(ValueError):
    """A feature file or a record that breaks the layout (version, dim, dtype, duplicate id)."""


def attr_str(value: Any) -> str:
    """An HDF5 string attribute as ``str`` (h5py returns ``bytes`` for some writers)."""
    return value.decode() if isinstance(value, bytes) else str(value)


class FileHandle:
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


class FeatureFile(FileHandle):
    """Read-only view of a ragged feature file; each ``get`` reads one image's rows.

    The small per-image arrays (offsets, sizes) are read once at open; the id -> position map
    is built on first use of an id lookup.

    Args:
        path: an existing feature file (with ``fileobj``: only its name, for messages).
        fileobj: a seekable binary file object to read instead of ``path`` (an object in a
            bucket: ``butd.store.objects``); it stays the caller's to close.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, fileobj: io.IOBase | BinaryIO | None = None
    ) -> None:
        self.path = Path(path)
        self._file = h5py.File(fileobj if fileobj is not None else self.path, "r")
        f = self._file
        if "offsets" not in f:
            self._file.close()
            raise FeatureFileError(f"{self.path} is not a butd feature file (no offsets)")
        self._n = min(len(f["offsets"]) - 1, len(f["image_ids"]))
        self._offsets = f["offsets"][: self._n + 1].astype(np.int64)
        self._w = f["image_w"][: self._n]
        self._h = f["image_h"][: self._n]
        self._rows = {name: f[name] for name in ("features", *ROW_SETS)}
        self._grids: h5py.Dataset | None = f.get("grids")
        self._id_dset = f["image_ids"].asstr()
        self._key_cache: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        self._index: dict[str, int] | None = None
        self.model_version = attr_str(f.attrs["model_version"])
        self.config: dict[str, Any] = json.loads(attr_str(f.attrs.get("config", "{}")))
        vocabs = [json.loads(attr_str(f.attrs.get(k, "[]"))) for k in _VOCABS]
        self.objects_vocab: list[str] = vocabs[0]
        self.attributes_vocab: list[str] = vocabs[1]
        # How the ids were made (butd.store.image_ids); files written before it was recorded:
        # unknown.
        self.id_policy: dict[str, Any] = json.loads(
            attr_str(f.attrs.get("image_id_policy", '{"rule": "unrecorded"}'))
        )

    @property
    def feature_dim(self) -> int:
        """D."""
        return int(self._rows["features"].shape[1])

    @property
    def feature_dtype(self) -> np.dtype[Any]:
        """Stored feature dtype (float16 or float32)."""
        dtype: np.dtype[Any] = np.dtype(self._rows["features"].dtype)
        return dtype

    @property
    def grid_size(self) -> int:
        """G of the stored grids; 0 when the file holds regions only."""
        return 0 if self._grids is None else int(self._grids.shape[1])

    def writer_meta(self) -> dict[str, Any]:
        """Keyword arguments that make a ``FeatureFileWriter`` of the same kind (no version)."""
        return {
            "config": self.config,
            "objects_vocab": self.objects_vocab,
            "attributes_vocab": self.attributes_vocab,
            "feature_dtype": self.feature_dtype.name,
            "feature_dim": self.feature_dim,
            "grid_size": self.grid_size,
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
        return FeatureRecord(
            image_id=str(self._id_dset[i]),
            image_w=int(self._w[i]),
            image_h=int(self._h[i]),
            model_version=self.model_version,
            grid=None if self._grids is None else self._grids[i],
            **arrays,
        )

    def read_stored(self, i: int) -> StoredRow:
        """The record at position ``i`` with the content sha256 and namespace stored with it."""
        sha, namespace = self._keys()
        return StoredRow(self.read_row(i), sha[i].decode(), namespace[i].decode())

    def __iter__(self) -> Iterator[FeatureRecord]:
        for i in range(self._n):
            yield self.read_row(i)
