"""Padded region batches: the one input every head consumes.

Shape glossary:
    B   images in the batch
    K   padded number of regions (max over the batch of N_i, 10..100 for the default rule)
    D   feature size (2048 for ResNet-101 C4)

A ``RegionBatch`` is built from ``butd.store.records.FeatureRecord`` objects (read from the ragged
HDF5 feature file, the store, or simulated). Padded rows are zero and ``mask`` is False there; heads
mask with ``mask`` only, never by testing for all-zero rows (heads-reference §11).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from butd.store.records import FeatureRecord


@dataclass(frozen=True)
class RegionBatch:
    """Padded regions of B images.

    Attributes:
        features: (B, K, D) float32 region features, zero on padded rows.
        mask: (B, K) bool, True on real regions.
        boxes: (B, K, 4) float32 x1, y1, x2, y2 in original-image pixels.
        spatial: (B, K, 6) float32 x1/W, y1/H, x2/W, y2/H, w/W, h/H.
        image_ids: B ids.
    """

    features: torch.Tensor
    mask: torch.Tensor
    boxes: torch.Tensor
    spatial: torch.Tensor
    image_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        b, k, _ = self.features.shape
        if self.mask.shape != (b, k) or self.mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool (B={b}, K={k}); got {self.mask.shape}")
        if self.boxes.shape != (b, k, 4) or self.spatial.shape != (b, k, 6):
            raise ValueError(f"boxes/spatial must be ({b}, {k}, 4/6); got {self.boxes.shape}")
        if len(self.image_ids) != b:
            raise ValueError(f"need {b} image ids; got {len(self.image_ids)}")
        if bool((self.mask.sum(1) == 0).any()):
            raise ValueError("every image needs at least one real region")

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def to(self, device: torch.device | str) -> RegionBatch:
        """The same batch on ``device``."""
        return RegionBatch(
            self.features.to(device),
            self.mask.to(device),
            self.boxes.to(device),
            self.spatial.to(device),
            self.image_ids,
        )

    def select(self, index: torch.Tensor | Sequence[int]) -> RegionBatch:
        """Rows ``index`` (repeats allowed), trimmed to the longest selected image."""
        idx = torch.as_tensor(index, dtype=torch.long, device=self.features.device)
        mask = self.mask[idx]
        k = max(int(mask.sum(1).max()), 1)
        return RegionBatch(
            self.features[idx, :k],
            mask[:, :k],
            self.boxes[idx, :k],
            self.spatial[idx, :k],
            tuple(self.image_ids[i] for i in idx.tolist()),
        )

    def zeroed(self) -> RegionBatch:
        """The blind control: same mask and boxes, all features zero."""
        return RegionBatch(
            torch.zeros_like(self.features), self.mask, self.boxes, self.spatial, self.image_ids
        )

    def mean_features(self) -> torch.Tensor:
        """(B, D) masked mean of the real regions (the Up-Down v̄)."""
        m = self.mask.unsqueeze(-1).to(self.features.dtype)
        return (self.features * m).sum(1) / m.sum(1).clamp(min=1.0)


class RegionSource(Protocol):
    """Anything that pads the images at given rows: a RegionBatch or a lazy file view."""

    def select(self, index: torch.Tensor | Sequence[int]) -> RegionBatch: ...


def collate_records(
    records: Sequence[FeatureRecord],
    *,
    max_regions: int | None = None,
    l2_normalise: bool = False,
) -> RegionBatch:
    """Pad records into one batch.

    Args:
        records: B feature records (any N_i >= 1, equal D).
        max_regions: keep at most this many regions per image (the first ones, as the Caffe
            captioner's ``max_boxes`` does); None keeps all.
        l2_normalise: divide each region feature by its L2 norm (Teney et al.).

    Returns:
        RegionBatch with K = max_i min(N_i, max_regions), features cast to float32.
    """
    if not records:
        raise ValueError("collate_records needs at least one record")
    dims = {r.feature_dim for r in records}
    if len(dims) != 1:
        raise ValueError(f"records disagree on the feature size: {sorted(dims)}")
    counts = [min(r.num_boxes, max_regions or r.num_boxes) for r in records]
    b, k, d = len(records), max(counts), dims.pop()
    feats = np.zeros((b, k, d), np.float32)
    boxes = np.zeros((b, k, 4), np.float32)
    spatial = np.zeros((b, k, 6), np.float32)
    mask = np.zeros((b, k), bool)
    for i, (rec, n) in enumerate(zip(records, counts, strict=True)):
        f = rec.features[:n].astype(np.float32)
        if l2_normalise:
            f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
        feats[i, :n], boxes[i, :n], mask[i, :n] = f, rec.boxes[:n], True
        spatial[i, :n] = rec.spatial_features()[:n]
    return RegionBatch(
        torch.from_numpy(feats),
        torch.from_numpy(mask),
        torch.from_numpy(boxes),
        torch.from_numpy(spatial),
        tuple(r.image_id for r in records),
    )


def grid_as_regions(record: FeatureRecord, grid_size: int) -> FeatureRecord:
    """The record's (G, G, D) grid as a set of G*G "regions" that every head reads.

    Cells are in row-major order (top row first), each with its cell rectangle as the box (in
    original-image pixels) and no label (ids 0, confidences 1); ``model_version`` and the image
    size are kept.

    Raises:
        ValueError: the record has no grid, or one of another size than ``grid_size``.
    """
    grid = record.grid
    if grid is None:
        raise ValueError(
            f"this head reads {grid_size}x{grid_size} grid features; image {record.image_id!r} "
            f"has regions only: extract it with grid_size={grid_size} (--grid-size)"
        )
    g, d = int(grid.shape[0]), int(grid.shape[2])
    if g != grid_size:
        raise ValueError(
            f"this head was trained on {grid_size}x{grid_size} grids; image {record.image_id!r} "
            f"has a {g}x{g} grid"
        )
    col, row = np.meshgrid(np.arange(g), np.arange(g))  # (G, G) each, row-major
    cw, ch = record.image_w / g, record.image_h / g
    boxes = np.stack([col * cw, row * ch, (col + 1) * cw, (row + 1) * ch], axis=-1)
    k = g * g
    return FeatureRecord(
        image_id=record.image_id,
        image_w=record.image_w,
        image_h=record.image_h,
        boxes=boxes.reshape(k, 4).astype(np.float32),
        features=grid.reshape(k, d),
        objects_id=np.zeros(k, np.int64),
        objects_conf=np.ones(k, np.float32),
        attrs_id=np.zeros(k, np.int64),
        attrs_conf=np.ones(k, np.float32),
        model_version=record.model_version,
        extra=dict(record.extra),
        grid=grid,
    )
