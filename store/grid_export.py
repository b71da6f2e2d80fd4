"""Export the grid features of a feature file as the per-image HDF5 layout grid-feature code reads.

Shape glossary: G grid side, D feature size.

Layout ``h5-grid`` (the "X101/X152 grid" files of grid-feature captioning and VQA code that
follows Jiang et al. 2020: ``grid-feats-vqa`` res5 maps average-pooled to 7 x 7 and stored one
dataset per image)::

    <key>_grids        (G*G, D) float32   cells in row-major order (top row first, left to right),
                                          i.e. a (D, G, G) map permuted to (G, G, D) and flattened
    root attributes: grid_size, feature_dim, model_version, butd_format = "grid-1"

``key`` is the integer COCO id the consumers look up (``butd.store.export_common``; ``ids="stored"``
keeps the stored id). A consumer reads ``h5py.File(path)[f"{key}_grids"][()]`` and gets
``(G*G, D)``. An id with a
"/" becomes an HDF5 group path, which reading by the same key resolves the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np

from butd.store.export_common import Progress, atomic, export_keys
from butd.store.h5 import FeatureFile, FeatureFileError

GRID_FORMAT = "grid-1"


def grid_key(image_id: str) -> str:
    """The dataset name of an image's grid: ``f"{image_id}_grids"``."""
    return f"{image_id}_grids"


def export_h5_grid(
    ff: FeatureFile,
    out: str | os.PathLike[str],
    *,
    ids: str = "consumer",
    progress: Progress | None = None,
) -> int:
    """Write every image's (G*G, D) float32 grid under ``<key>_grids``; returns N.

    Keys are the integer COCO ids by default (``ids="stored"``: the stored ids).

    Raises:
        FeatureFileError: the file was extracted without grids (``--grid-size``).
        ImageIdError: a stored id with no integer key (``ids="consumer"``).
    """
    if not ff.grid_size:
        raise FeatureFileError(
            f"{ff.path} holds no grid features; extract with --grid-size G (e.g. 7) to export them"
        )
    g, d = ff.grid_size, ff.feature_dim
    keys = export_keys(ff, "h5-grid", ids)
    with atomic(Path(out)) as tmp, h5py.File(tmp, "w") as h5:
        h5.attrs.update(
            butd_format=GRID_FORMAT, grid_size=g, feature_dim=d, model_version=ff.model_version
        )
        n = 0
        for key, rec in zip(keys, ff, strict=True):
            assert rec.grid is not None  # a grid file gives every record its grid
            h5.create_dataset(grid_key(str(key)), data=rec.grid.reshape(g * g, d), dtype="f4")
            n += 1
            if progress is not None:
                progress(1)
    return n


def read_grid(path: str | os.PathLike[str], image_id: str) -> np.ndarray:
    """(G*G, D) float32 grid of ``image_id`` from an ``h5-grid`` file, as consumers read it."""
    with h5py.File(path, "r") as h5:
        return np.asarray(h5[grid_key(image_id)][()], dtype=np.float32)
