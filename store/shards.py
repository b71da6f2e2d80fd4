"""A directory of sealed shard files: write once under a temp name, rename, read by position.

A shard is a ragged feature file (``butd.store.h5`` layout) whose rows all carry
``content_sha256`` (sha256 of the image bytes) and, when the image came with a user id, the
alias ``(namespace, image_id)``. A shard may also hold an alias table
(``alias_namespace``, ``alias_image_id``, ``alias_sha256``) for ids whose content is stored in
another row: a resubmission under a new id, or a duplicate dropped by ``compact``. With the root
attributes ``model_version`` and ``sealed_at`` (ns) this is everything ``butd.store.index.reindex``
needs: the index can always be rebuilt from the files alone.

Crash safety: a shard is written as ``.tmp-<name>`` and ``os.replace``-d to ``<name>`` when
complete, so a half-written shard is never visible under a shard name; ``clean_temp`` removes
stale temp files. Names are ``<worker>-<seq>-<uuid>.h5`` (unique across processes and hosts).

Readers (``ShardReaders``) open files lazily, in the process that reads (never before a fork:
HDF5 handles must not cross a fork, reference serving §0.8), and keep at most ``max_open``
handles. A handle keeps working after ``compact`` unlinks its file (POSIX).
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import h5py
import numpy as np

from butd.store.h5 import FeatureFile
from butd.store.h5_writer import FeatureFileWriter
from butd.store.records import FeatureRecord, StoredRow

logger = logging.getLogger(__name__)

SUFFIX = ".h5"
TMP_PREFIX = ".tmp-"
RETIRED_SUFFIX = ".retired"
_STR = h5py.string_dtype("utf-8")
_SEQ = itertools.count()
_ALIAS_SETS = ("alias_namespace", "alias_image_id", "alias_sha256")
T = TypeVar("T")


class ShardMissingError(LookupError):
    """A shard named by the index is not in the directory (compacted away: look up again)."""


@dataclass(frozen=True)
class Location:
    """Where a record lives: shard file name and image position inside it."""

    shard: str
    row: int


@dataclass(frozen=True)
class Alias:
    """A user id for stored content: ``(namespace, image_id) -> content_sha256``."""

    namespace: str
    image_id: str
    content_sha256: str


@dataclass(frozen=True)
class ShardInfo:
    """A sealed shard: file name (in its directory) and number of images."""

    name: str
    rows: int


@dataclass(frozen=True)
class ShardEntries:
    """What one shard contributes to the index (see ``scan_shard``)."""

    name: str
    model_version: str
    sealed_at: int
    contents: list[tuple[str, int]]  # (content_sha256, row)
    aliases: list[Alias]


@dataclass(frozen=True)
class Move:
    """A record that ``compact`` moved: the index should follow if it still points at ``old``."""

    model_version: str
    content_sha256: str
    old: Location
    new: Location


def new_shard_name(worker_id: str) -> str:
    """``<worker>-<seq>-<uuid>.h5``; the worker id is reduced to ``[A-Za-z0-9_.]``."""
    worker = re.sub(r"[^A-Za-z0-9_.]", "_", worker_id) or "w"
    return f"{worker}-{next(_SEQ):08d}-{uuid.uuid4().hex}{SUFFIX}"


def list_shards(directory: str | os.PathLike[str]) -> list[str]:
    """Sealed, not retired shard names in ``directory``, sorted by name."""
    d = Path(directory)
    names = {p.name for p in d.glob(f"*{SUFFIX}") if not p.name.startswith(".")}
    retired = {p.name[: -len(RETIRED_SUFFIX)] for p in d.glob(f"*{SUFFIX}{RETIRED_SUFFIX}")}
    return sorted(names - retired)


def clean_temp(directory: str | os.PathLike[str], *, older_than_s: float = 600.0) -> int:
    """Remove ``.tmp-*`` files older than ``older_than_s`` (left by a crashed writer).

    A younger temp file may belong to a writer still at work and is kept. Returns the count.
    """
    removed = 0
    now = time.time()
    for path in Path(directory).glob(f"{TMP_PREFIX}*"):
        try:
            if now - path.stat().st_mtime >= older_than_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    if removed:
        logger.info("removed %d stale temp shard files from %s", removed, directory)
    return removed


def _write_aliases(h5: h5py.File, aliases: Sequence[Alias]) -> None:
    columns = {
        "alias_namespace": [a.namespace for a in aliases],
        "alias_image_id": [a.image_id for a in aliases],
        "alias_sha256": [a.content_sha256 for a in aliases],
    }
    for name, values in columns.items():
        h5.create_dataset(name, data=np.array(values, dtype=object), dtype=_STR)


def seal_shard(
    directory: str | os.PathLike[str],
    rows: Iterable[StoredRow],
    *,
    model_version: str,
    meta: dict[str, Any] | None = None,
    aliases: Sequence[Alias] = (),
    worker_id: str = "w",
    sealed_at: int | None = None,
) -> ShardInfo:
    """Write ``rows`` as a new shard (temp name, then atomic rename) and return it.

    Args:
        directory: the store directory (created when missing).
        rows: records of ``model_version``, each with its content sha256 (required) and the
            namespace of its id ("" when none).
        model_version: stored as the root attribute; records must match.
        meta: FeatureFileWriter metadata: config, objects_vocab, attributes_vocab,
            feature_dtype (default "float16"), feature_dim and grid_size (default: from the
            records; a shard holds one model version, so all or none carry a grid).
        aliases: extra ``(namespace, image_id) -> sha`` bindings to store with the shard.
        worker_id: prefix of the shard name.
        sealed_at: ns timestamp (default now); reindex replays shards in this order.

    Raises:
        ValueError: a record without a content sha256, or nothing to write.
    """
    rows, meta = list(rows), dict(meta or {})
    records = [row.record for row in rows]
    if not records and not aliases:
        raise ValueError("a shard needs at least one record or alias")
    for row in rows:
        if not row.content_sha256:
            raise ValueError(f"record {row.image_id!r} has no content sha256")
    meta.setdefault("feature_dim", records[0].feature_dim if records else 1)
    first_grid = records[0].grid if records else None
    meta.setdefault("grid_size", 0 if first_grid is None else int(first_grid.shape[0]))
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = new_shard_name(worker_id)
    tmp = d / f"{TMP_PREFIX}{name}"
    try:
        hint = (len(records), sum(rec.num_boxes for rec in records))
        with FeatureFileWriter(
            tmp, model_version=model_version, unique_ids=False, size_hint=hint, **meta
        ) as writer:
            writer.append(rows)
        with h5py.File(tmp, "a") as h5:
            _write_aliases(h5, aliases)
            h5.attrs["sealed_at"] = int(sealed_at if sealed_at is not None else time.time_ns())
        os.replace(tmp, d / name)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.debug("sealed shard %s (%d images, %d aliases)", name, len(records), len(aliases))
    return ShardInfo(name=name, rows=len(records))


@dataclass(frozen=True)
class ShardWriter:
    """Seal shards for one worker: fixed directory, worker id, model version and metadata
    (``meta``: see ``seal_shard``)."""

    directory: str | os.PathLike[str]
    worker_id: str
    model_version: str
    meta: dict[str, Any] = field(default_factory=dict)

    def seal(self, rows: Iterable[StoredRow], aliases: Sequence[Alias] = ()) -> ShardInfo:
        """Write one shard; see ``seal_shard``."""
        return seal_shard(
            self.directory,
            rows,
            model_version=self.model_version,
            meta=self.meta,
            aliases=aliases,
            worker_id=self.worker_id,
        )


def read_aliases(path: str | os.PathLike[str]) -> list[Alias]:
    """The alias table of one shard (empty when it has none)."""
    with h5py.File(path, "r") as h5:
        if "alias_sha256" not in h5:
            return []
        cols = [h5[name].asstr()[:].tolist() for name in _ALIAS_SETS]
    return [Alias(ns, image_id, sha) for ns, image_id, sha in zip(*cols, strict=True)]


def shard_sealed_at(path: str | os.PathLike[str]) -> int:
    """The ``sealed_at`` attribute (ns) of a shard; 0 when missing."""
    with h5py.File(path, "r") as h5:
        return int(h5.attrs.get("sealed_at", 0))


def scan_shard(directory: str | os.PathLike[str], name: str) -> ShardEntries:
    """Read a shard's index entries: contents (sha, row) and aliases (rows' + table)."""
    path = Path(directory) / name
    with FeatureFile(path) as ff:
        shas, namespaces, ids = ff.content_sha256(), ff.namespaces(), ff.ids()
        version = ff.model_version
    aliases = [Alias(ns, i, s) for s, ns, i in zip(shas, namespaces, ids, strict=True) if ns and s]
    return ShardEntries(
        name=name,
        model_version=version,
        sealed_at=shard_sealed_at(path),
        contents=[(sha, row) for row, sha in enumerate(shas) if sha],
        aliases=aliases + read_aliases(path),
    )


class ShardReaders:
    """A bounded LRU cache of read-only shard handles, opened lazily in the reading process.

    Thread-safe: one lock guards the cache and each read (h5py serialises reads anyway).
    A process forked after handles were opened drops them and opens its own.

    Args:
        directory: the store directory.
        max_open: most open files at once; the least recently used is closed first.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_open: int = 64) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1; got {max_open}")
        self.directory = Path(directory)
        self.max_open = max_open
        self._handles: OrderedDict[str, FeatureFile] = OrderedDict()
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def _handle(self, shard: str) -> FeatureFile:
        if os.getpid() != self._pid:  # forked: the parent's HDF5 handles are not ours
            self._handles = OrderedDict()
            self._pid = os.getpid()
        ff = self._handles.get(shard)
        if ff is not None:
            self._handles.move_to_end(shard)
            return ff
        ff = self._open(shard)
        self._handles[shard] = ff
        while len(self._handles) > self.max_open:
            _, old = self._handles.popitem(last=False)
            old.close()
            self._closed(old)
        return ff

    def _open(self, shard: str) -> FeatureFile:
        """Open one shard (``butd.store.objects.BucketShardReaders`` opens it from a bucket)."""
        try:
            return FeatureFile(self.directory / shard)
        except FileNotFoundError as err:
            raise ShardMissingError(f"shard {shard!r} is not in {self.directory}") from err

    def _closed(self, ff: FeatureFile) -> None:
        """Called after a handle was closed (a subclass releases what it opened with it)."""

    def with_file(self, shard: str, fn: Callable[[FeatureFile], T]) -> T:
        """``fn`` applied to the open handle of ``shard`` (under the lock)."""
        with self._lock:
            return fn(self._handle(shard))

    def read(self, shard: str, row: int) -> FeatureRecord:
        """The record at image position ``row`` of ``shard``.

        Raises:
            ShardMissingError: the shard file is gone (compacted): look the id up again.
            IndexError: ``row`` out of range.
        """
        with self._lock:
            return self._handle(shard).read_row(row)

    def get(self, location: Location) -> FeatureRecord:
        """The record at ``location``."""
        return self.read(location.shard, location.row)

    @property
    def open_count(self) -> int:
        """Number of open handles."""
        return len(self._handles)

    def close(self) -> None:
        """Close every handle."""
        with self._lock:
            while self._handles:
                _, ff = self._handles.popitem()
                ff.close()
                self._closed(ff)
