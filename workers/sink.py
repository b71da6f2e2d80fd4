"""The worker's side of the feature store: seal shards, then index them (``butd.store.shards``,
``butd.store.index``).

``StoreSink.seal`` writes one batch's new records as a sealed shard under ``STORE/shards``
(temp name, atomic rename; each row carries its content sha256 and the (namespace, image_id)
alias it was computed for), plus an alias table for ids whose content is stored elsewhere (a
cached image under a new id). Only then does it put the shard into the Redis index (first wins,
idempotent), so an indexed record is always on disk and the index can be rebuilt from the files.
``has`` answers from the index: a redelivered entry finds its records and computes nothing. A
shard sealed while Redis is down is kept in memory and indexed first thing once Redis answers,
before any lookup, so the worker re-reading its pending entries does not compute them again.
A shard that adds nothing to the index once indexed (a worker cut off mid-batch sealed what
another worker had reclaimed and stored meanwhile) is deleted: no row is stored twice.
``seal`` and ``has`` may be called from two threads (the online sealer and the main loop).

Aliases are also appended to ``STORE/aliases/NAMESPACE.tsv`` (``image_id TAB sha256``), the
layout ``butd.service.shard_store`` reads today.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import redis

from butd.store.index import FeatureIndex
from butd.store.objects import BucketShards
from butd.store.records import FeatureRecord
from butd.store.shards import Alias, ShardEntries, seal_shard
from butd.workers.batcher import AliasTriple, StoredItem

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StoreSink:
    """Seal records under ``root/shards`` and index them in Redis.

    Args:
        root: the store directory shared with the gateway.
        index: the Redis feature index.
        worker_id: prefix of the shard names this worker writes.
        meta: ``seal_shard`` metadata besides the config (vocabularies, feature_dim, dtype).
        bucket: where sealed shards go when they live in object storage: each is sealed in
            ``root/shards`` first, uploaded, deleted locally, then indexed. None = stay local.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        index: FeatureIndex,
        *,
        worker_id: str,
        meta: dict[str, Any],
        bucket: BucketShards | None = None,
    ) -> None:
        self.root = Path(root)
        self.bucket = bucket
        self.shards = self.root / "shards"
        self.aliases_dir = self.root / "aliases"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.aliases_dir.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.worker_id = worker_id
        self.meta = meta
        self._unindexed: list[ShardEntries] = []
        self._lock = threading.Lock()  # the sealer thread seals while the main loop asks has()

    def has(self, model_version: str, sha256: str) -> bool:
        """True when the index holds this content for this model version."""
        self._flush()
        return self.index.lookup_content(model_version, sha256) is not None

    def has_many(self, model_version: str, sha256s: Sequence[str]) -> list[bool]:
        """``has`` of each content, in one round trip."""
        self._flush()
        known = self.index.stored_contents(model_version, sha256s)
        return [s in known for s in sha256s]

    def seal(
        self,
        name: str,
        records: Sequence[StoredItem],
        model_version: str,
        config: dict[str, Any],
        aliases: Sequence[AliasTriple] = (),
    ) -> None:
        """Seal new records and the aliases not yet bound as one shard, then index it.

        Args:
            name: the batch's name, for the log.
            records: new records with their content key and the alias they were computed for.
            aliases: every (namespace, image_id, sha256) the batch resolved, cached ones too.
        """
        fresh = self._not_stored(model_version, records)
        rows = [_row(item) for item in fresh]
        row_aliases = {(i.namespace, i.image_id, i.content_sha256) for i in fresh}
        named = [(i.namespace, i.image_id, i.content_sha256) for i in records]
        wanted = dict.fromkeys([*named, *aliases])
        extra = [a for a in wanted if a not in row_aliases and self._unbound(a)]
        if rows or extra:
            info = seal_shard(
                self.shards,
                rows,
                model_version=model_version,
                meta={**self.meta, "config": config},
                aliases=[Alias(*a) for a in extra],
                worker_id=self.worker_id,
            )
            if self.bucket is not None:
                self.bucket.upload(self.shards / info.name)
            bound = [Alias(*a) for a in (*row_aliases, *extra) if a[0]]
            contents = [(item.content_sha256, row) for row, item in enumerate(fresh)]
            with self._lock:
                self._unindexed.append(ShardEntries(info.name, model_version, 0, contents, bound))
            log.debug("%s: sealed %s (%d rows, %d aliases)", name, info.name, len(rows), len(extra))
        self._append_alias_files([*row_aliases, *extra])
        self._flush()

    def _not_stored(self, model_version: str, records: Sequence[StoredItem]) -> list[StoredItem]:
        """The records whose content nobody has indexed since they were computed: a worker
        cut off mid-batch (its entry reclaimed and finished by another) seals nothing twice.
        With Redis unreachable every record is kept (sealed now, indexed once Redis is back)."""
        try:
            stored = self.index.stored_contents(model_version, [i.content_sha256 for i in records])
        except redis.RedisError:
            return list(records)
        if stored:
            log.info(
                "%d of %d records were stored meanwhile; not sealed again",
                len(stored),
                len(records),
            )
        return [i for i in records if i.content_sha256 not in stored]

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

    def _unbound(self, alias: AliasTriple) -> bool:
        namespace, image_id, sha = alias
        return bool(namespace) and self.index.lookup_alias(namespace, image_id) != sha

    def _append_alias_files(self, aliases: Sequence[AliasTriple]) -> None:
        by_ns: dict[str, list[str]] = {}
        for namespace, image_id, sha in aliases:
            by_ns.setdefault(namespace, []).append(f"{image_id}\t{sha}\n")
        for namespace, lines in by_ns.items():
            path = self.aliases_dir / f"{_UNSAFE.sub('_', namespace) or '_'}.tsv"
            with open(path, "a", encoding="utf-8") as fh:
                fh.writelines(lines)


def _row(item: StoredItem) -> FeatureRecord:
    extra = {"content_sha256": item.content_sha256, "namespace": item.namespace}
    return replace(item.record, image_id=item.image_id, extra=extra)
