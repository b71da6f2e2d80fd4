"""Seal so that a record the store cannot hold fails alone (torch-free).

A shard is one HDF5 file for many records; one record the store refuses (h5py: "VLEN strings
do not support embedded NULLs") would fail the whole file. ``seal_isolated`` seals the group
as one shard and, only when that fails with such an error, once per record (with its aliases)
and once per remaining alias, so the good ones are stored and the bad ones reported by key.
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
    from butd.workers.batcher import AliasTriple, FeatureSink, StoredItem

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


def seal_isolated(
    sink: FeatureSink,
    name: str,
    records: Sequence[StoredItem],
    model_version: str,
    config: dict[str, Any],
    aliases: Sequence[AliasTriple] = (),
) -> Unstored:
    """``sink.seal`` the group; on an unstorable record, seal apart (see the module doc)."""
    try:
        sink.seal(name, records, model_version, config, aliases)
        return Unstored()
    except UNSTORABLE as exc:
        log.warning(
            "%s: one shard of %d records failed (%s); sealing apart", name, len(records), exc
        )
    return _seal_apart(sink, name, records, model_version, config, aliases)


def _seal_apart(
    sink: FeatureSink,
    name: str,
    records: Sequence[StoredItem],
    model_version: str,
    config: dict[str, Any],
    aliases: Sequence[AliasTriple],
) -> Unstored:
    by_sha: dict[str, list[AliasTriple]] = {}
    for alias in aliases:
        by_sha.setdefault(alias[2], []).append(alias)
    lost = Unstored()
    for record in records:
        bound = by_sha.pop(record.content_sha256, [])
        try:
            sink.seal(name, [record], model_version, config, bound)
        except UNSTORABLE as exc:
            log.error("%s: record %r not stored: %s", name, record.image_id, exc)
            lost.records[record.content_sha256] = str(exc)
    for alias in (a for rest in by_sha.values() for a in rest):
        try:
            sink.seal(name, [], model_version, config, [alias])
        except UNSTORABLE as exc:
            log.error("%s: alias %r not stored: %s", name, alias[1], exc)
            lost.aliases[(alias[0], alias[1])] = str(exc)
    return lost
