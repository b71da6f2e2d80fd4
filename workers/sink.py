"""The worker's view of the feature store: sealed shard files plus a lookup by content.

``ShardDirSink`` seals each batch's new records as one ragged HDF5 file
(``store.h5.write_feature_file``: temp name, then atomic rename) under ``STORE/shards/`` and
finds stored (model_version, content_sha256) pairs by reading the per-image datasets of the
sealed files, rescanning the directory for files other workers sealed since. Aliases go to
``STORE/aliases/NAMESPACE.tsv`` lines (append-only, idempotent on read).

File names come from the stream entry (``job-J-S-ENTRY-K-VERSION.h5``), so a redelivered entry
that recomputes after a crash replaces its own earlier file instead of adding duplicate rows.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from store.h5 import FeatureFile, write_feature_file
from store.records import FeatureRecord
from workers.batcher import StoredItem

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ShardDirSink:
    """Seal records under ``root/shards`` and look them up by (model_version, sha256).

    Args:
        root: the store directory shared with the gateway.
        meta: FeatureFileWriter keyword arguments besides model_version and config
            (vocabularies, feature_dim, feature_dtype).
    """

    def __init__(self, root: str | os.PathLike[str], meta: dict[str, Any]) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.aliases_dir = self.root / "aliases"
        self.shards.mkdir(parents=True, exist_ok=True)
        self.aliases_dir.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self._known: set[tuple[str, str]] = set()
        self._scanned: dict[str, float] = {}

    def has(self, model_version: str, sha256: str) -> bool:
        """True when a sealed file holds this content for this model version."""
        if (model_version, sha256) not in self._known:
            self._rescan()
        return (model_version, sha256) in self._known

    def _rescan(self) -> None:
        for path in self.shards.glob("*.h5"):
            mtime = path.stat().st_mtime
            if self._scanned.get(path.name) == mtime:
                continue
            with FeatureFile(path) as f:
                version = f.model_version
                self._known.update((version, sha) for sha in f.content_sha256() if sha)
            self._scanned[path.name] = mtime

    def seal(
        self, name: str, records: Sequence[StoredItem], model_version: str, config: dict[str, Any]
    ) -> None:
        """Write one sealed file of ``records`` (image id = content sha256)."""
        path = self.shards / f"{_UNSAFE.sub('_', name)}.h5"
        recs = [_with_key(item) for item in records]
        write_feature_file(path, recs, model_version=model_version, config=config, **self.meta)
        self._known.update((model_version, item.content_sha256) for item in records)
        self._scanned[path.name] = path.stat().st_mtime
        log.debug("sealed %d records in %s", len(recs), path)

    def add_aliases(self, aliases: Sequence[tuple[str, str, str]]) -> None:
        """Append ``image_id TAB sha256`` lines to the namespace's alias file."""
        by_ns: dict[str, list[str]] = {}
        for namespace, image_id, sha in aliases:
            by_ns.setdefault(namespace, []).append(f"{image_id}\t{sha}\n")
        for namespace, lines in by_ns.items():
            path = self.aliases_dir / f"{_UNSAFE.sub('_', namespace) or '_'}.tsv"
            with open(path, "a", encoding="utf-8") as fh:
                fh.writelines(lines)


def _with_key(item: StoredItem) -> FeatureRecord:
    extra = {"content_sha256": item.content_sha256, "namespace": item.namespace}
    return replace(item.record, image_id=item.content_sha256, extra=extra)
