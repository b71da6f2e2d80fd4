"""The contract every package consumes: one image's regions, as numpy arrays.

Shape glossary:
    N   kept regions of one image (10..100 with the default selection rule)
    G   grid side of the optional grid features (G x G cells)
    D   feature size (2048 for ResNet-101 C4; smaller for narrow test models)

Conventions (ARCHITECTURE.md, STYLE.md §5):
    boxes are absolute ``x1, y1, x2, y2`` float32 in original-image pixels;
    ``objects_id`` / ``attrs_id`` are 0-based into the 1600-object / 400-attribute vocabularies
    (background and "no attribute" excluded), exactly as in the LXMERT TSV files;
    ``objects_conf`` / ``attrs_conf`` are the probabilities of those ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating[Any]]
IntArray = npt.NDArray[np.integer[Any]]


class RecordError(ValueError):
    """A FeatureRecord whose arrays disagree in shape or dtype."""


@dataclass(frozen=True)
class FeatureRecord:
    """Regions of one image.

    Attributes:
        image_id: the caller's id for the image (a file's relative path, a dataset id, a hash).
        image_w: original image width in pixels.
        image_h: original image height in pixels.
        boxes: (N, 4) float32, x1, y1, x2, y2 in original-image pixels.
        features: (N, D) float32 or float16 pooled region features.
        objects_id: (N,) int64, 0-based object class (background excluded).
        objects_conf: (N,) float32, probability of ``objects_id``.
        attrs_id: (N,) int64, 0-based attribute (no-attribute excluded).
        attrs_conf: (N,) float32, probability of ``attrs_id``.
        model_version: hash of the weights and the extraction config that produced the record.
        extra: free-form side information of whoever made the record (the heads' simulator
            keeps each region's scene object here); not compared, never stored. The store's
            keys travel in ``StoredRow``.
        grid: optional (G, G, D) float32 or float16 grid features of the whole image from the
            same detector pass (row-major cells, top-left first); None when not requested.
    """

    image_id: str
    image_w: int
    image_h: int
    boxes: FloatArray
    features: FloatArray
    objects_id: IntArray
    objects_conf: FloatArray
    attrs_id: IntArray
    attrs_conf: FloatArray
    model_version: str
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    grid: FloatArray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        n = self.num_boxes
        _check(self.boxes, "boxes", (n, 4), np.float32)
        if self.features.ndim != 2 or self.features.shape[0] != n:
            raise RecordError(f"features must be (N={n}, D); got {self.features.shape}")
        if self.features.dtype not in (np.float32, np.float16):
            raise RecordError(f"features must be float32 or float16; got {self.features.dtype}")
        _check(self.objects_id, "objects_id", (n,), np.int64)
        _check(self.objects_conf, "objects_conf", (n,), np.float32)
        _check(self.attrs_id, "attrs_id", (n,), np.int64)
        _check(self.attrs_conf, "attrs_conf", (n,), np.float32)
        if self.grid is not None:
            _check_grid(self.grid, self.feature_dim)
        if self.image_w <= 0 or self.image_h <= 0:
            raise RecordError(f"image size must be positive; got {self.image_w}x{self.image_h}")

    @property
    def num_boxes(self) -> int:
        """N, the number of regions."""
        return int(self.boxes.shape[0])

    @property
    def feature_dim(self) -> int:
        """D, the feature size."""
        return int(self.features.shape[1])

    def spatial_features(self) -> FloatArray:
        """(N, 6) float32: x1/W, y1/H, x2/W, y2/H, w/W, h/H (the hengyuan-hu / BAN layout)."""
        w, h = float(self.image_w), float(self.image_h)
        b = self.boxes.astype(np.float32)
        scale = np.array([w, h, w, h], dtype=np.float32)
        norm = b / scale
        wh = np.stack([(b[:, 2] - b[:, 0]) / w, (b[:, 3] - b[:, 1]) / h], axis=1)
        return np.concatenate([norm, wh.astype(np.float32)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class StoredRow:
    """A record as a feature file or shard stores it: with the keys it is filed under.

    Attributes:
        record: the regions; its ``image_id`` is the id stored with them.
        content_sha256: sha256 (hex) of the image bytes the record was computed from; every
            shard row has one (the index's key), "" in a plain extraction file that has none.
        namespace: the id space of ``record.image_id`` ("" when the id is no alias).
    """

    record: FeatureRecord
    content_sha256: str = ""
    namespace: str = ""

    @property
    def image_id(self) -> str:
        """The stored id (``record.image_id``)."""
        return self.record.image_id


@dataclass(frozen=True)
class StoredRecord:
    """A stored record with what is needed to render it (what the gateway's store reads return).

    Attributes:
        record: the regions (features (N, D) float16 as stored).
        sha256: content hash of the image bytes.
        objects_vocab: names of the object ids (from the shard file).
        attributes_vocab: names of the attribute ids (from the shard file).
        description: human-readable description of the model.
    """

    record: FeatureRecord
    sha256: str
    objects_vocab: tuple[str, ...]
    attributes_vocab: tuple[str, ...]
    description: str = ""


def as_row(item: FeatureRecord | StoredRow) -> StoredRow:
    """``item`` as a row: a bare record is stored without keys."""
    return item if isinstance(item, StoredRow) else StoredRow(item)


def _check_grid(grid: Any, dim: int) -> None:
    if not isinstance(grid, np.ndarray):
        raise RecordError(f"grid must be a numpy array; got {type(grid).__name__}")
    if grid.ndim != 3 or grid.shape[0] != grid.shape[1] or grid.shape[2] != dim:
        raise RecordError(f"grid must be (G, G, D={dim}); got {grid.shape}")
    if grid.dtype not in (np.float32, np.float16):
        raise RecordError(f"grid must be float32 or float16; got {grid.dtype}")


def _check(arr: Any, name: str, shape: tuple[int, ...], dtype: type) -> None:
    if not isinstance(arr, np.ndarray):
        raise RecordError(f"{name} must be a numpy array; got {type(arr).__name__}")
    if arr.shape != shape:
        raise RecordError(f"{name} must have shape {shape}; got {arr.shape}")
    if arr.dtype != dtype:
        raise RecordError(f"{name} must be {np.dtype(dtype).name}; got {arr.dtype}")
