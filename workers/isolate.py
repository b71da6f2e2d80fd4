"""Put records in a sink so that one the store cannot hold fails alone (torch-free).

A shard is one HDF5 file for many records; one record the store refuses (h5py: "VLEN strings
do not support embedded NULLs") would fail the whole file. ``put_isolated`` puts the group in
the sink (one shard) and, only when that fails with such an error, once per record (with its
aliases) and once per remaining alias, so the good ones are stored and the bad ones reported
by key. A sink that stores later (``FeatureSink.put``) raises nothing here: it isolates when
it stores, through this function on the store itself.
A transient error (``OSError``, Redis) propagates unchanged: the caller leaves its entries
pending and they are redelivered.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from butd.workers.outcomes import Failed, Outcome

if TYPE_CHECKING:
    from butd.store.records import StoredRow
    from butd.store.shards import Alias
    from butd.workers.batcher import FeatureSink

log = logging.getLogger(__name__)

# Errors that say a record can never be stored (retrying the same record fails again).
UNSTORABLE: tuple[type[Exception], ...] = (ValueError, TypeError)


@dataclass
class Unstored:
    """What a seal could not store: content sha256 -> reason, (namespace, image_id) -> reason."""

    records: dict[str, str] = field(default_factory=dict)
    aliases: dict[tuple[str, str], str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.records or self.aliases)

    def fail(self, outcome: Outcome) -> Outcome:
        """``outcome`` ``Failed`` with the reason when its record or alias was not stored."""
        if isinstance(outcome, Failed):
            return outcome
        reason = self.records.get(outcome.content_sha256) or self.aliases.get(
            (outcome.task.namespace, outcome.task.image_id)
        )
        if reason is None:
            return outcome
        return Failed(outcome.task, f"cannot be stored: {reason}", outcome.content_sha256)


def put_isolated(
    sink: FeatureSink,
    name: str,
    rows: Sequence[StoredRow],
    model_version: str,
    config: dict[str, Any],
    aliases: Sequence[Alias] = (),
) -> Unstored:
    """``sink.put`` the group; on an unstorable row, put each apart (see the module doc)."""
    try:
        sink.put(name, rows, model_version, config, aliases)
        return Unstored()
    except UNSTORABLE as exc:
        log.warning("%s: one shard of %d records failed (%s); sealing apart", name, len(rows), exc)
    return _put_apart(sink, name, rows, model_version, config, aliases)


def _put_apart(
    sink: FeatureSink,
    name: str,
    rows: Sequence[StoredRow],
    model_version: str,
    config: dict[str, Any],
    aliases: Sequence[Alias],
) -> Unstored:
    by_sha: dict[str, list[Alias]] = {}
    for alias in aliases:
        by_sha.setdefault(alias.content_sha256, []).append(alias)
    lost = Unstored()
    for row in rows:
        bound = by_sha.pop(row.content_sha256, [])
        try:
            sink.put(name, [row], model_version, config, bound)
        except UNSTORABLE as exc:
            log.error("%s: record %r not stored: %s", name, row.image_id, exc)
            lost.records[row.content_sha256] = str(exc)
    for alias in (a for rest in by_sha.values() for a in rest):
        try:
            sink.put(name, [], model_version, config, [alias])
        except UNSTORABLE as exc:
            log.error("%s: alias %r not stored: %s", name, alias.image_id, exc)
            lost.aliases[(alias.namespace, alias.image_id)] = str(exc)
    return lost
