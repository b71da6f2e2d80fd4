"""The gateway's side of the feature store: the Redis index and the sealed shard files.

Lookups go through ``butd.store.index.FeatureIndex`` (``(model_version, sha256) -> (shard, row)``,
``(namespace, image_id) -> sha256``) and reads through ``butd.store.shards.ShardReaders`` (a bounded
LRU of read-only HDF5 handles under ``STORE/shards``). A shard compacted away between lookup and
read (``ShardMissingError``) is looked up once more.

Vocabularies and the model description are read once per model version from the first shard
that holds one of its records. Records read are kept in an LRU bounded in bytes
(``cache_bytes``): a (model_version, sha256) key always names the same record (content
addressed, first-wins index), so a cached copy never goes stale, and a hot image is served
without touching HDF5. An alias the gateway binds (a cache hit under a new id) is sealed
as an alias-only shard before it is indexed, so the index stays rebuildable from the files.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from butd.service.backend import StoredRecord
from butd.service.errors import InvalidRequestError, NotFoundError
from butd.store.exporters import EXPORTERS, PaddingError
from butd.store.h5 import FeatureFile
from butd.store.h5_writer import write_feature_file
from butd.store.image_ids import ImageIdError
from butd.store.index import FeatureIndex
from butd.store.objects import BucketShards, open_readers
from butd.store.records import FeatureRecord
from butd.store.shards import (
    Alias,
    Location,
    ShardEntries,
    ShardMissingError,
    seal_shard,
)

logger = logging.getLogger(__name__)

# Records answered by workers kept to bridge the seal that follows the answer (milliseconds to a
# second): 128 covers over a second at 100 requests/s, ~50 MB of 100 x 2048 fp16 regions.
RECENT_RECORDS = 128
# Aliases of those answers (small strings): kept longer.
RECENT_ALIASES = 4096


@dataclass(frozen=True)
class _VersionMeta:
    """What every shard of one model version shares."""

    objects_vocab: tuple[str, ...]
    attributes_vocab: tuple[str, ...]
    description: str
    config: dict[str, Any]
    feature_dim: int
    feature_dtype: str
    grid_size: int = 0


def _meta_of(f: FeatureFile) -> _VersionMeta:
    return _VersionMeta(
        objects_vocab=tuple(f.objects_vocab),
        attributes_vocab=tuple(f.attributes_vocab),
        description=str(f.config.get("description", "")),
        config=dict(f.config),
        feature_dim=f.feature_dim,
        feature_dtype=f.feature_dtype.name,
        grid_size=f.grid_size,
    )


class IndexedStore:
    """``butd.service.backend.FeatureStore`` over the Redis index and ``STORE/shards``.

    Args:
        root: the store directory shared with the workers.
        index: the feature index (its Redis client is the gateway's).
        max_open: most shard files kept open at once.
        cache_bytes: budget of the in-memory record LRU (array bytes); 0 disables it.
        store_url: the bucket prefix of the sealed shards (``butd.store.objects``), or None for
            ``root/shards``. Alias-only shards the gateway seals are uploaded there too.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        index: FeatureIndex,
        *,
        max_open: int = 64,
        cache_bytes: int = 0,
        store_url: str | None = None,
    ) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.bucket = BucketShards(store_url) if store_url else None
        self.readers = open_readers(self.shards, store_url, max_open=max_open)
        self._meta: dict[str, _VersionMeta] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], StoredRecord] = OrderedDict()
        self._cache_budget = cache_bytes
        self._cache_used = 0
        self._recent: OrderedDict[tuple[str, str], StoredRecord] = OrderedDict()
        self._recent_aliases: OrderedDict[tuple[str, str], str] = OrderedDict()

    def _cached(self, key: tuple[str, str]) -> StoredRecord | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _remember(self, key: tuple[str, str], stored: StoredRecord) -> None:
        size = _nbytes(stored.record)
        if size > self._cache_budget:
            return
        with self._lock:
            if key in self._cache:
                return
            self._cache[key] = stored
            self._cache_used += size
            while self._cache_used > self._cache_budget:
                _, old = self._cache.popitem(last=False)
                self._cache_used -= _nbytes(old.record)

    def _version_meta(self, model_version: str, shard: str) -> _VersionMeta:
        with self._lock:
            meta = self._meta.get(model_version)
            if meta is None:
                meta = self.readers.with_file(shard, _meta_of)
                self._meta[model_version] = meta
            return meta

    def _read(self, model_version: str, sha256: str) -> tuple[FeatureRecord, Location] | None:
        for _ in range(2):  # a compacted shard: the index moved on, look again
            location = self.index.lookup_content(model_version, sha256)
            if location is None:
                return None
            try:
                return self.readers.get(location), location
            except ShardMissingError:
                logger.info("shard %s compacted away; looking %s up again", location.shard, sha256)
        return None

    def get(self, model_version: str, sha256: str) -> StoredRecord | None:
        """The record stored for these bytes under ``model_version``, or None."""
        hit = self._cached((model_version, sha256))
        if hit is not None:
            return hit
        found = self._read(model_version, sha256)
        if found is None:
            with self._lock:
                return self._recent.get((model_version, sha256))  # answered, not sealed yet
        record, location = found
        meta = self._version_meta(model_version, location.shard)
        stored = StoredRecord(
            record=record,
            sha256=sha256,
            objects_vocab=meta.objects_vocab,
            attributes_vocab=meta.attributes_vocab,
            description=meta.description,
        )
        self._remember((model_version, sha256), stored)
        return stored

    def remember(
        self, model_version: str, stored: StoredRecord, alias: tuple[str, str] | None = None
    ) -> None:
        """Keep a record a worker answered with, which it seals right after answering.

        It goes into the record LRU (a later read skips HDF5) and, with its alias, into a
        short list of recent answers that ``get`` and ``resolve`` fall back on while the index
        does not hold them yet: a GET right after the POST does not race the seal. The
        (model_version, sha256) key is content addressed and first-wins, so the record is the
        one the index will name.

        Args:
            alias: (namespace, image_id) the request named, or None.
        """
        key = (model_version, stored.sha256)
        self._remember(key, stored)
        with self._lock:
            self._recent[key] = stored
            if alias is not None and alias[0]:
                self._recent_aliases[alias] = stored.sha256
            while len(self._recent) > RECENT_RECORDS:
                self._recent.popitem(last=False)
            while len(self._recent_aliases) > RECENT_ALIASES:
                self._recent_aliases.popitem(last=False)

    def resolve(self, namespace: str, image_id: str) -> str | None:
        """The sha256 the alias (namespace, image_id) names, or None."""
        found = self.index.lookup_alias(namespace, image_id)
        if found is None:
            with self._lock:
                found = self._recent_aliases.get((namespace, image_id))
        return found

    def add_alias(self, namespace: str, image_id: str, sha256: str) -> None:
        """Bind an alias (first wins): sealed as an alias-only shard, then indexed."""
        if self.index.lookup_alias(namespace, image_id) is not None:
            return
        alias = Alias(namespace, image_id, sha256)
        info = seal_shard(self.shards, [], model_version="", aliases=[alias], worker_id="gateway")
        if self.bucket is not None:
            self.bucket.upload(self.shards / info.name)
        self.index.put_shard(ShardEntries(info.name, "", 0, [], [alias]))

    def export(
        self,
        model_version: str,
        namespace: str,
        image_ids: Sequence[str],
        fmt: str,
        out: Path,
        options: dict[str, Any] | None = None,
    ) -> int:
        """Write the stored records of ``image_ids`` (under those ids) in format ``fmt``.

        The records are gathered into a temporary ragged file that the store's exporter
        converts (``options``: its keyword arguments, e.g. ``ids``, ``allow_padding``);
        ``npz`` / ``npz-mcan`` (one file per image) are delivered as a zip of them.

        Raises:
            NotFoundError: none of the ids has a record under ``model_version``.
            InvalidRequestError: the exporter refused (ids it cannot convert, padding).
        """
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            ragged = Path(tmp) / "records.h5"
            count = self._gather(model_version, namespace, image_ids, ragged)
            if count == 0:
                raise NotFoundError(
                    f"none of the {len(image_ids)} images is stored under model {model_version}"
                )
            with FeatureFile(ragged) as ff:
                if fmt == "h5-grid" and not ff.grid_size:
                    raise InvalidRequestError(
                        f"the records under model {model_version} have no grid features; pass "
                        "the model_version of a grid_size extraction (its X-Model-Version)"
                    )
                try:
                    if fmt.startswith("npz"):
                        EXPORTERS[fmt](ff, Path(tmp) / "npz", **(options or {}))
                        _zip_dir(Path(tmp) / "npz", out)
                    else:
                        EXPORTERS[fmt](ff, out, **(options or {}))
                except (ImageIdError, PaddingError) as exc:
                    raise InvalidRequestError(str(exc)) from exc
        return count

    def _gather(
        self, model_version: str, namespace: str, image_ids: Sequence[str], out: Path
    ) -> int:
        def records() -> Any:
            for image_id in image_ids:
                sha = self.resolve(namespace, image_id)
                found = None if sha is None else self._read(model_version, sha)
                if found is not None:
                    self._version_meta(model_version, found[1].shard)
                    yield replace(found[0], image_id=image_id, extra={})

        stream = records()
        first = next(stream, None)
        if first is None:
            return 0
        meta = self._meta[model_version]
        return write_feature_file(
            out,
            _chain(first, stream),
            model_version=model_version,
            config=meta.config,
            objects_vocab=meta.objects_vocab,
            attributes_vocab=meta.attributes_vocab,
            feature_dim=meta.feature_dim,
            feature_dtype=meta.feature_dtype,
            grid_size=meta.grid_size,
        )

    def close(self) -> None:
        """Close every open shard file."""
        self.readers.close()


def _nbytes(record: FeatureRecord) -> int:
    arrays = (record.boxes, record.features, record.objects_id, record.objects_conf)
    grid = 0 if record.grid is None else record.grid.nbytes
    return sum(a.nbytes for a in (*arrays, record.attrs_id, record.attrs_conf)) + grid + 512


def _chain(first: FeatureRecord, rest: Any) -> Any:
    yield first
    yield from rest


def _zip_dir(directory: Path, out: Path) -> None:
    """Zip the files of ``directory`` (flat, stored: npz files are compressed already)."""
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, arcname=path.name)
    shutil.move(tmp, out)
