"""The shard store's front door: its write side ``StoreWriter`` and its read side ``StoreReader``.

The store is sealed HDF5 shards under ``STORE/shards`` (``butd.store.shards``; in a bucket when
``store_url`` is set, ``butd.store.objects``) and the Redis index over them
(``butd.store.index``: ``(model_version, sha256) -> (shard, row)``,
``(namespace, image_id) -> sha256``). Every write goes to the files first and to the index
second, so an indexed record is always on disk and the index can be rebuilt from the files.

* ``StoreWriter`` (the worker's, and the gateway's for aliases): ``put`` seals a batch's new
  rows and the aliases not bound yet as one shard, uploads it, then indexes it (first wins). A
  shard that adds nothing once indexed (another worker stored all of it meanwhile) is deleted.
  A shard sealed while Redis is down is indexed first thing once Redis answers, before any
  ``has``, so a redelivered entry finds its records and computes nothing. ``bind_alias`` seals
  one alias as an alias-only shard, then indexes it.
* ``StoreReader`` (the gateway's): ``get`` a record by content, ``resolve`` an alias,
  ``remember`` a record a worker answered with before its seal, ``add_alias``, ``export`` the
  records of many ids in one of ``butd.store.exporters``' formats. Records read are kept in an
  LRU bounded in bytes: a (model_version, sha256) key always names the same record (content
  addressed, first-wins index), so a cached copy never goes stale. A shard compacted away
  between lookup and read (``ShardMissingError``) is looked up once more.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import redis

from butd.store.exporters import EXPORTERS, PaddingError
from butd.store.h5 import FeatureFile
from butd.store.h5_writer import write_feature_file
from butd.store.image_ids import ImageIdError
from butd.store.index import FeatureIndex
from butd.store.objects import BucketShards, open_readers
from butd.store.records import FeatureRecord, StoredRecord, StoredRow
from butd.store.shards import Alias, Location, ShardEntries, ShardMissingError, seal_shard

log = logging.getLogger(__name__)

# Records answered by workers kept to bridge the seal that follows the answer (milliseconds to a
# second): 128 covers over a second at 100 requests/s, ~50 MB of 100 x 2048 fp16 regions.
RECENT_RECORDS = 128
# Aliases of those answers (small strings): kept longer.
RECENT_ALIASES = 4096


class NothingStoredError(LookupError):
    """None of the ids asked for has a record under the model version."""


class ExportRefusedError(ValueError):
    """The exporter refused the records (ids it cannot convert, padding, no grid features)."""


class StoreWriter:
    """Seal rows and aliases under ``root/shards`` (or a bucket), then index them in Redis.

    ``put`` and ``has`` may be called from two threads (the worker's sealer and main loop).

    Args:
        root: the store directory shared with the gateway.
        index: the Redis feature index.
        writer_id: prefix of the shard names this writer seals.
        meta: ``seal_shard`` metadata besides the config (vocabularies, feature_dim, dtype).
        store_url: the bucket prefix of the sealed shards: each is sealed in ``root/shards``
            first, uploaded, deleted locally, then indexed. None: they stay in ``root/shards``.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        index: FeatureIndex,
        *,
        writer_id: str,
        meta: dict[str, Any] | None = None,
        store_url: str | None = None,
    ) -> None:
        self.shards = Path(root) / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.writer_id = writer_id
        self.meta = dict(meta or {})
        self.bucket = BucketShards(store_url) if store_url else None
        self._unindexed: list[ShardEntries] = []
        self._lock = threading.Lock()

    def has(self, model_version: str, sha256: str) -> bool:
        """True when the index holds this content for this model version."""
        self._flush()
        return self.index.lookup_content(model_version, sha256) is not None

    def has_many(self, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        """``has`` of each content, in one round trip."""
        self._flush()
        known = self.index.stored_contents(model_version, sha256s)
        return [s in known for s in sha256s]

    def put(
        self,
        name: str,
        rows: Sequence[StoredRow],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[Alias] = (),
    ) -> None:
        """Seal the rows not stored yet and the aliases not bound yet as one shard, then index it.

        On return the shard is on disk (or in the bucket) and indexed. Redis down: the shard is
        sealed, the call raises, and the shard is indexed before the next ``has`` answers.

        Args:
            name: the batch's name, for the log.
            rows: new records of ``model_version`` (made under ``config``) with their keys.
            aliases: every (namespace, image_id, sha256) the batch resolved, cached ones too.

        Raises:
            ValueError, TypeError: a row or alias the store can never hold (h5py refuses it).
            redis.RedisError: the index is unreachable (the shard waits to be indexed).
        """
        fresh = self._not_stored(model_version, rows)
        in_rows = dict.fromkeys(Alias(r.namespace, r.image_id, r.content_sha256) for r in fresh)
        named = [Alias(r.namespace, r.image_id, r.content_sha256) for r in rows]
        wanted = dict.fromkeys([*named, *aliases])
        extra = [a for a in wanted if a not in in_rows and self._unbound(a)]
        if fresh or extra:
            meta = {**self.meta, "config": config}
            info = seal_shard(self.shards, fresh, model_version=model_version, meta=meta,
                              aliases=extra, worker_id=self.writer_id)  # fmt: skip
            self._upload(info.name)
            bound = [a for a in (*in_rows, *extra) if a.namespace]
            contents = [(row.content_sha256, i) for i, row in enumerate(fresh)]
            with self._lock:
                self._unindexed.append(ShardEntries(info.name, model_version, 0, contents, bound))
            log.debug(
                "%s: sealed %s (%d rows, %d aliases)", name, info.name, len(fresh), len(extra)
            )
        self._flush()

    def bind_alias(self, alias: Alias) -> None:
        """Bind ``alias`` unless its id is bound already (first wins): an alias-only shard is
        sealed (and uploaded), then indexed."""
        if self.index.lookup_alias(alias.namespace, alias.image_id) is not None:
            return
        info = seal_shard(self.shards, [], model_version="", aliases=[alias],
                          worker_id=self.writer_id)  # fmt: skip
        self._upload(info.name)
        self.index.put_shard(ShardEntries(info.name, "", 0, [], [alias]))

    def _upload(self, name: str) -> None:
        if self.bucket is not None:
            self.bucket.upload(self.shards / name)

    def _not_stored(self, model_version: str, rows: Sequence[StoredRow]) -> list[StoredRow]:
        """The rows whose content nobody has indexed since they were computed: a worker cut
        off mid-batch (its entry reclaimed and finished by another) seals nothing twice. With
        Redis unreachable every row is kept (sealed now, indexed once Redis is back)."""
        try:
            stored = self.index.stored_contents(model_version, [r.content_sha256 for r in rows])
        except redis.RedisError:
            return list(rows)
        if stored:
            log.info("%d of %d records were stored meanwhile; not sealed again",
                     len(stored), len(rows))  # fmt: skip
        return [r for r in rows if r.content_sha256 not in stored]

    def _flush(self) -> None:
        """Index the sealed shards not yet indexed (Redis was down when they were sealed)."""
        with self._lock:
            while self._unindexed:
                entries = self._unindexed[0]
                if not self.index.put_shard(entries):
                    self._delete(entries.name)
                self._unindexed.pop(0)

    def _delete(self, name: str) -> None:
        """Delete a sealed shard that added nothing to the index: another worker stored all of
        it meanwhile (this one was cut off mid-batch, its entries reclaimed and finished)."""
        log.info("shard %s was stored meanwhile by another worker; deleted", name)
        if self.bucket is not None:
            self.bucket.delete(name)
        else:
            (self.shards / name).unlink(missing_ok=True)

    def _unbound(self, alias: Alias) -> bool:
        if not alias.namespace:
            return False
        return self.index.lookup_alias(alias.namespace, alias.image_id) != alias.content_sha256


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


class StoreReader:
    """Records by content or alias, and exports, over the Redis index and the sealed shards.

    Vocabularies and the model description are read once per model version from the first
    shard that holds one of its records.

    Args:
        root: the store directory shared with the workers.
        index: the feature index (its Redis client is the gateway's).
        max_open: most shard files kept open at once.
        cache_bytes: budget of the in-memory record LRU (array bytes); 0 disables it.
        store_url: the bucket prefix of the sealed shards (``butd.store.objects``), or None for
            ``root/shards``. Alias-only shards (``add_alias``) are uploaded there too.
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
        self.writer = StoreWriter(root, index, writer_id="gateway", store_url=store_url)
        self.index = index
        self.readers = open_readers(self.root / "shards", store_url, max_open=max_open)
        self._meta: dict[str, _VersionMeta] = {}
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], StoredRecord] = OrderedDict()
        self._cache_budget = cache_bytes
        self._cache_used = 0
        self._recent: OrderedDict[tuple[str, str], StoredRecord] = OrderedDict()
        self._recent_aliases: OrderedDict[tuple[str, str], str] = OrderedDict()

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
        stored = StoredRecord(record, sha256, meta.objects_vocab, meta.attributes_vocab,
                              meta.description)  # fmt: skip
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
        self.writer.bind_alias(Alias(namespace, image_id, sha256))

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

        Returns:
            The number of records written (ids with no record are left out).

        Raises:
            NothingStoredError: none of the ids has a record under ``model_version``.
            ExportRefusedError: the exporter refused (ids it cannot convert, padding, grids).
        """
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            ragged = Path(tmp) / "records.h5"
            count = self._gather(model_version, namespace, image_ids, ragged)
            if count == 0:
                raise NothingStoredError(
                    f"none of the {len(image_ids)} images is stored under model {model_version}"
                )
            with FeatureFile(ragged) as ff:
                if fmt == "h5-grid" and not ff.grid_size:
                    raise ExportRefusedError(
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
                    raise ExportRefusedError(str(exc)) from exc
        return count

    def close(self) -> None:
        """Close every open shard file."""
        self.readers.close()

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
                log.info("shard %s compacted away; looking %s up again", location.shard, sha256)
        return None

    def _gather(
        self, model_version: str, namespace: str, image_ids: Sequence[str], out: Path
    ) -> int:
        """Write the records of ``image_ids`` (under those ids, without store keys) to ``out``."""

        def records() -> Iterator[FeatureRecord]:
            for image_id in image_ids:
                sha = self.resolve(namespace, image_id)
                found = None if sha is None else self._read(model_version, sha)
                if found is not None:
                    self._version_meta(model_version, found[1].shard)
                    yield replace(found[0], image_id=image_id)

        stream = records()
        first = next(stream, None)
        if first is None:
            return 0
        meta = self._meta[model_version]
        return write_feature_file(
            out,
            itertools.chain([first], stream),
            model_version=model_version,
            config=meta.config,
            objects_vocab=meta.objects_vocab,
            attributes_vocab=meta.attributes_vocab,
            feature_dim=meta.feature_dim,
            feature_dtype=meta.feature_dtype,
            grid_size=meta.grid_size,
        )


def _nbytes(record: FeatureRecord) -> int:
    arrays = (record.boxes, record.features, record.objects_id, record.objects_conf)
    grid = 0 if record.grid is None else record.grid.nbytes
    return sum(a.nbytes for a in (*arrays, record.attrs_id, record.attrs_conf)) + grid + 512


def _zip_dir(directory: Path, out: Path) -> None:
    """Zip the files of ``directory`` (flat, stored: npz files are compressed already)."""
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, arcname=path.name)
    shutil.move(tmp, out)
