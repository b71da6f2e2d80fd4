"""The gateway's read side of the feature store: sealed shard files + alias files.

Layout written by the workers (``workers.sink.ShardDirSink``)::

    STORE/shards/*.h5            sealed ragged feature files (store.h5); image_id = sha256
    STORE/aliases/NAMESPACE.tsv  "image_id TAB sha256" lines, append-only (last line wins)

``ShardDirStore`` keeps an in-memory index (model_version, sha256) -> (file, row), refreshed
when the shards directory changes (its mtime moves on every atomic rename into it), and a
bounded LRU of open read-only files. A shard replaced by a redelivered batch is re-indexed and
its old handle closed. Aliases written by the gateway go to the same TSV files.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from service.backend import StoredRecord
from service.errors import NotFoundError
from store.exporters import EXPORTERS
from store.h5 import FeatureFile, write_feature_file
from store.records import FeatureRecord

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SETTLE_NS = 1_000_000_000  # 1 s


def alias_file(root: Path, namespace: str) -> Path:
    """The alias TSV of a namespace (same naming rule as the workers)."""
    return root / "aliases" / f"{_UNSAFE.sub('_', namespace) or '_'}.tsv"


class ShardDirStore:
    """``service.backend.FeatureStore`` over ``STORE/shards`` and ``STORE/aliases``.

    Args:
        root: the store directory shared with the workers.
        max_open: most shard files kept open at once (LRU).
    """

    def __init__(self, root: str | os.PathLike[str], *, max_open: int = 64) -> None:
        self.root = Path(root)
        self.shards = self.root / "shards"
        self.shards.mkdir(parents=True, exist_ok=True)
        (self.root / "aliases").mkdir(parents=True, exist_ok=True)
        self._max_open = max_open
        self._lock = threading.RLock()
        self._index: dict[tuple[str, str], tuple[str, int]] = {}
        self._mtimes: dict[str, int] = {}
        self._dir_mtime = -1
        self._open: OrderedDict[str, FeatureFile] = OrderedDict()
        self._aliases: dict[str, tuple[int, dict[str, str]]] = {}

    # --- index ------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Index shard files added or replaced since the last look (cheap when none).

        The directory's mtime has a coarse clock tick: while it is younger than
        ``_SETTLE_NS`` a second rename in the same tick could hide, so the scan is repeated.
        """
        dir_mtime = self.shards.stat().st_mtime_ns
        settled = time.time_ns() - dir_mtime > _SETTLE_NS
        if dir_mtime == self._dir_mtime and settled:
            return
        self._dir_mtime = dir_mtime
        for path in self.shards.glob("*.h5"):
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._mtimes.get(path.name) != mtime:
                self._index_file(path, mtime)

    def _index_file(self, path: Path, mtime: int) -> None:
        self._close(path.name)
        with FeatureFile(path) as f:
            version = f.model_version
            for row, sha in enumerate(f.content_sha256()):
                if sha:
                    self._index[(version, sha)] = (path.name, row)
        self._mtimes[path.name] = mtime

    def _file(self, name: str) -> FeatureFile:
        handle = self._open.get(name)
        if handle is None:
            handle = FeatureFile(self.shards / name)
            self._open[name] = handle
            while len(self._open) > self._max_open:
                _, oldest = self._open.popitem(last=False)
                oldest.close()
        self._open.move_to_end(name)
        return handle

    def _close(self, name: str) -> None:
        handle = self._open.pop(name, None)
        if handle is not None:
            handle.close()

    def _read(self, model_version: str, sha256: str) -> tuple[FeatureRecord, FeatureFile] | None:
        with self._lock:
            where = self._index.get((model_version, sha256))
            if where is None:
                self._refresh()
                where = self._index.get((model_version, sha256))
            if where is None:
                return None
            handle = self._file(where[0])
            return handle.read_row(where[1]), handle

    # --- FeatureStore -------------------------------------------------------------------

    def get(self, model_version: str, sha256: str) -> StoredRecord | None:
        """The record stored for these bytes under ``model_version``, or None."""
        found = self._read(model_version, sha256)
        if found is None:
            return None
        record, handle = found
        return StoredRecord(
            record=record,
            sha256=sha256,
            objects_vocab=tuple(handle.objects_vocab),
            attributes_vocab=tuple(handle.attributes_vocab),
            description=str(handle.config.get("description", "")),
        )

    def resolve(self, namespace: str, image_id: str) -> str | None:
        """The sha256 the alias (namespace, image_id) points to, or None."""
        return self._alias_map(namespace).get(image_id)

    def _alias_map(self, namespace: str) -> dict[str, str]:
        path = alias_file(self.root, namespace)
        try:
            size = path.stat().st_size  # append-only: the size grows with every alias
        except FileNotFoundError:
            return {}
        with self._lock:
            cached = self._aliases.get(namespace)
            if cached is not None and cached[0] == size:
                return cached[1]
            mapping: dict[str, str] = {}
            with path.open(encoding="utf-8") as fh:
                for line in fh:
                    image_id, _, sha = line.rstrip("\n").rpartition("\t")
                    if image_id and len(sha) == 64:
                        mapping[image_id] = sha
            self._aliases[namespace] = (size, mapping)
            return mapping

    def add_alias(self, namespace: str, image_id: str, sha256: str) -> None:
        """Append the alias unless it already says so (one short O_APPEND write)."""
        if self.resolve(namespace, image_id) == sha256:
            return
        if "\n" in image_id or "\t" in image_id:
            raise ValueError(f"image ids cannot hold tabs or newlines: {image_id!r}")
        with alias_file(self.root, namespace).open("a", encoding="utf-8") as fh:
            fh.write(f"{image_id}\t{sha256}\n")

    def export(
        self, model_version: str, namespace: str, image_ids: Sequence[str], fmt: str, out: Path
    ) -> int:
        """Write the cached records of ``image_ids`` (under the caller's ids) as ``fmt``.

        The records are first gathered into a temporary ragged file, which the store's
        exporter converts; ``npz`` (one file per image) is delivered as a zip of them.
        """
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            ragged = Path(tmp) / "records.h5"
            count = self._gather(model_version, namespace, image_ids, ragged)
            if count == 0:
                raise NotFoundError(
                    f"none of the {len(image_ids)} images is stored under model {model_version}"
                )
            with FeatureFile(ragged) as ff:
                if fmt == "npz":
                    EXPORTERS[fmt](ff, Path(tmp) / "npz")
                    _zip_dir(Path(tmp) / "npz", out)
                else:
                    EXPORTERS[fmt](ff, out)
        return count

    def _gather(
        self, model_version: str, namespace: str, image_ids: Sequence[str], out: Path
    ) -> int:
        records: list[FeatureRecord] = []
        meta: dict[str, Any] = {}
        for image_id in image_ids:
            sha = self.resolve(namespace, image_id)
            found = None if sha is None else self._read(model_version, sha)
            if found is None:
                continue
            record, handle = found
            records.append(replace(record, image_id=image_id))
            meta = meta or {
                "config": handle.config,
                "objects_vocab": handle.objects_vocab,
                "attributes_vocab": handle.attributes_vocab,
                "feature_dim": handle.feature_dim,
                "feature_dtype": handle.feature_dtype.name,
            }
        if records:
            write_feature_file(out, records, model_version=model_version, **meta)
        return len(records)

    def close(self) -> None:
        """Close every open shard file."""
        with self._lock:
            for name in list(self._open):
                self._close(name)


def _zip_dir(directory: Path, out: Path) -> None:
    """Zip the files of ``directory`` (flat, stored: npz files are compressed already)."""
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in sorted(directory.iterdir()):
            zf.write(path, arcname=path.name)
    shutil.move(tmp, out)
