"""Compaction of a shard directory: merge small shards into large ones while readers work.

The merged shard is sealed first (``butd.store.shards.seal_shard``: temp name, rename), then the
index entries that still point at the old places are moved (``relocate``), then the old files
are removed, or renamed ``*.retired`` and purged after a grace period. A reader holding an old
file keeps reading it (POSIX keeps an unlinked file alive while it is open); one that opens an
old name after the move gets ``ShardMissingError`` and looks the id up again. Duplicated content
within a merged group is stored once; its other ids become aliases.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from butd.store.h5 import FeatureFile
from butd.store.records import StoredRow
from butd.store.shards import (
    RETIRED_SUFFIX,
    SUFFIX,
    Alias,
    Location,
    Move,
    ShardInfo,
    clean_temp,
    list_shards,
    read_aliases,
    seal_shard,
    shard_sealed_at,
)

logger = logging.getLogger(__name__)

# Called with the moves of one merge, after the merged shard is sealed (e.g. the index's relocate).
Relocate = Callable[[list[Move]], object]


@dataclass(frozen=True)
class CompactResult:
    """What ``compact`` did: shards merged away, shards written, duplicate rows dropped."""

    merged: list[str]
    written: list[ShardInfo]
    duplicates: int
    purged: int


def purge_retired(directory: str | os.PathLike[str], *, grace_s: float) -> int:
    """Delete retired shards whose retirement marker is at least ``grace_s`` old."""
    purged, now = 0, time.time()
    for marker in Path(directory).glob(f"*{SUFFIX}{RETIRED_SUFFIX}"):
        try:
            if now - marker.stat().st_mtime < grace_s:
                continue
            shard = marker.with_name(marker.name[: -len(RETIRED_SUFFIX)])
            shard.unlink(missing_ok=True)
            marker.unlink()
            purged += 1
        except FileNotFoundError:
            continue
    return purged


def _retire(directory: Path, names: Sequence[str], grace_s: float) -> None:
    """Unlink now (grace 0) or mark for ``purge_retired``; open handles keep reading (POSIX)."""
    for name in names:
        if grace_s <= 0:
            (directory / name).unlink(missing_ok=True)
        else:
            (directory / f"{name}{RETIRED_SUFFIX}").touch()


def _small_groups(directory: Path, min_rows: int, max_rows: int) -> list[list[str]]:
    """Batches (>= 2 shards, <= max_rows images) of shards under ``min_rows``, per version."""
    by_version: dict[str, list[tuple[int, str, int]]] = {}
    for name in list_shards(directory):
        with FeatureFile(directory / name) as ff:
            rows, version = len(ff), ff.model_version
        if rows < min_rows:
            by_version.setdefault(version, []).append(
                (shard_sealed_at(directory / name), name, rows)
            )
    groups: list[list[str]] = []
    for shards in by_version.values():
        batch: list[str] = []
        total = 0
        for _, name, rows in sorted(shards):
            if batch and total + rows > max_rows:
                groups.append(batch)
                batch, total = [], 0
            batch.append(name)
            total += rows
        groups.append(batch)
    return [g for g in groups if len(g) >= 2]


def _merge_meta(directory: Path, sources: list[str]) -> tuple[str, dict[str, Any]]:
    """Model version and writer metadata for a merge, from the first source with images
    (an alias-only shard may carry a placeholder feature size)."""
    for name in sources:
        with FeatureFile(directory / name) as ff:
            if len(ff) or name == sources[-1]:
                return ff.model_version, ff.writer_meta()
    raise ValueError("nothing to merge")


def _merge(
    directory: Path, sources: list[str], worker_id: str
) -> tuple[ShardInfo, list[Move], int]:
    """Write one shard holding each content of ``sources`` once; returns it, moves, dups."""
    kept: list[StoredRow] = []
    aliases: list[Alias] = []
    moves: list[tuple[str, str, Location, int]] = []  # version, sha, old, new row
    seen: dict[str, int] = {}
    version, meta = _merge_meta(directory, sources)
    for name in sources:
        with FeatureFile(directory / name) as ff:
            for row in range(len(ff)):
                stored = ff.read_stored(row)
                sha = stored.content_sha256
                if sha in seen and stored.namespace:
                    aliases.append(Alias(stored.namespace, stored.image_id, sha))
                if sha not in seen:
                    seen[sha] = len(kept)
                    kept.append(stored)
                moves.append((version, sha, Location(name, row), seen[sha]))
        aliases.extend(read_aliases(directory / name))
    sealed_at = min(shard_sealed_at(directory / name) for name in sources)
    info = seal_shard(directory, kept, model_version=version, meta=meta, aliases=aliases,
                      worker_id=worker_id, sealed_at=sealed_at)  # fmt: skip
    new_moves = [Move(v, sha, old, Location(info.name, row)) for v, sha, old, row in moves]
    return info, new_moves, len(moves) - len(kept)


def compact(
    directory: str | os.PathLike[str],
    *,
    min_rows: int,
    max_rows: int = 100_000,
    relocate: Relocate | None = None,
    grace_s: float = 0.0,
    worker_id: str = "compact",
) -> CompactResult:
    """Merge shards with fewer than ``min_rows`` images into larger ones, dropping duplicates.

    Order per merged batch: (1) seal the new shard, (2) ``relocate(moves)`` so the index points
    at it (an index compare-and-set: only entries still pointing at the old location move),
    (3) retire the old shards: unlink at once when ``grace_s`` is 0, else leave a
    ``.retired`` marker for a later ``purge_retired``. A crash between steps leaves both
    copies; the index stays valid and the next ``compact`` merges again. Duplicates are found
    within a merged batch; the dropped row's ``(namespace, image_id)`` is kept as an alias.
    Stale temp files and expired retired shards are removed first.

    Args:
        directory: the store directory.
        min_rows: shards with fewer images are merged.
        max_rows: most images per merged shard.
        relocate: callback given every moved record (``butd.store.index.FeatureIndex.relocate``).
        grace_s: seconds a retired shard stays on disk for readers that looked it up earlier.
        worker_id: name prefix of the merged shards.
    """
    d = Path(directory)
    clean_temp(d)
    purged = purge_retired(d, grace_s=grace_s)
    merged: list[str] = []
    written: list[ShardInfo] = []
    duplicates = 0
    for sources in _small_groups(d, min_rows, max_rows):
        info, moves, dups = _merge(d, sources, worker_id)
        if relocate is not None:
            relocate(moves)
        _retire(d, sources, grace_s)
        merged += sources
        written.append(info)
        duplicates += dups
        logger.info("compacted %d shards into %s (%d images, %d duplicates dropped)",
                    len(sources), info.name, info.rows, dups)  # fmt: skip
    return CompactResult(merged=merged, written=written, duplicates=duplicates, purged=purged)
