"""The feature index in Redis, always rebuildable from the shard files alone.

Keys (``prefix`` default ``butd:store``):

* ``{prefix}:loc:{model_version}``: hash ``content_sha256 -> "<shard>:<row>"``. A record is
  stored once per (model_version, content); the content key is the sha256 of the image bytes.
* ``{prefix}:alias:{namespace}``: hash ``image_id -> content_sha256``. Aliases are **global**,
  not per model_version: they name image bytes, and the bytes do not change with the model, so
  one upload can be looked up under every model version that extracted it.

Writes are idempotent and first-wins (``HSETNX``): a redelivered record does not move an
entry, and when two shards hold the same content the index points at the first one written
(``compact`` later drops the other copy). An alias, once bound, keeps its content; a later
binding of the same ``(namespace, image_id)`` to other bytes is refused (``put_alias``
returns the existing sha). ``reindex`` replays shards in ``sealed_at`` order, so it reproduces
the same first-wins answers. Limitation: ``compact`` stamps a merged shard with the oldest
``sealed_at`` of its sources, so a refused rebinding held in a merged shard can win a later
``reindex`` if the merged batch is older than the winning shard.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import redis

from butd.store.shards import Location, Move, ShardEntries, list_shards, scan_shard

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "butd:store"
_PIPELINE = 1000  # commands per pipeline round trip

# KEYS[1] loc hash; ARGV: sha, expected old value, new value. Moves only what still points
# at the old location (compare-and-set), so a concurrent first-wins put is never overwritten.
_RELOCATE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS[1] alias hash, KEYS[2] loc hash; ARGV[1] image_id. Alias then content in one round trip.
_LOOKUP_LUA = """
local sha = redis.call('HGET', KEYS[1], ARGV[1])
if not sha then return false end
return redis.call('HGET', KEYS[2], sha)
"""


def _encode(location: Location) -> str:
    return f"{location.shard}:{location.row}"


def _decode(value: bytes | str) -> Location:
    text = value.decode() if isinstance(value, bytes) else value
    shard, _, row = text.rpartition(":")
    return Location(shard=shard, row=int(row))


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class ReindexResult:
    """What ``reindex`` rebuilt: shards read, content entries, alias entries."""

    shards: int
    contents: int
    aliases: int


class FeatureIndex:
    """``(model_version, sha256) -> Location`` and ``(namespace, image_id) -> sha256`` in Redis.

    Args:
        client: a redis-py client (bytes or decoded responses).
        prefix: key prefix; tests and rebuilds use their own.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self._relocate = client.register_script(_RELOCATE_LUA)
        self._lookup = client.register_script(_LOOKUP_LUA)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX) -> FeatureIndex:
        """An index over a new client for ``url``."""
        return cls(redis.Redis.from_url(url), prefix=prefix)

    def loc_key(self, model_version: str) -> str:
        """Hash of content locations for one model version."""
        return f"{self.prefix}:loc:{model_version}"

    def alias_key(self, namespace: str) -> str:
        """Hash of aliases in one namespace."""
        return f"{self.prefix}:alias:{namespace}"

    def lookup_content(self, model_version: str, content_sha256: str) -> Location | None:
        """Where the record of these image bytes under this model version lives, or None."""
        value = self.client.hget(self.loc_key(model_version), content_sha256)
        return None if value is None else _decode(value)

    def stored_contents(self, model_version: str, shas: Sequence[str]) -> set[str]:
        """Those of ``shas`` that have a record under ``model_version`` (one HMGET)."""
        if not shas:
            return set()
        values = self.client.hmget(self.loc_key(model_version), list(shas))
        return {sha for sha, value in zip(shas, values, strict=True) if value is not None}

    def lookup_alias(self, namespace: str, image_id: str) -> str | None:
        """The content sha256 bound to ``(namespace, image_id)``, or None."""
        return _text(self.client.hget(self.alias_key(namespace), image_id))

    def lookup(self, model_version: str, namespace: str, image_id: str) -> Location | None:
        """Alias, then content: the location of a user id's record, or None (one round trip)."""
        keys = [self.alias_key(namespace), self.loc_key(model_version)]
        value = self._lookup(keys=keys, args=[image_id])
        return None if value is None else _decode(cast(bytes, value))

    def put(
        self,
        model_version: str,
        content_sha256: str,
        location: Location,
        aliases: Iterable[tuple[str, str]] = (),
    ) -> Location:
        """Record a location (first wins) and bind aliases; returns the location in force.

        Args:
            aliases: ``(namespace, image_id)`` pairs naming these bytes.
        """
        pipe = self.client.pipeline(transaction=False)
        pipe.hsetnx(self.loc_key(model_version), content_sha256, _encode(location))
        pipe.hget(self.loc_key(model_version), content_sha256)
        for namespace, image_id in aliases:
            pipe.hsetnx(self.alias_key(namespace), image_id, content_sha256)
        results = pipe.execute()
        return _decode(results[1])

    def put_alias(self, namespace: str, image_id: str, content_sha256: str) -> str:
        """Bind an alias (first wins); returns the sha the alias names after the call."""
        pipe = self.client.pipeline(transaction=False)
        pipe.hsetnx(self.alias_key(namespace), image_id, content_sha256)
        pipe.hget(self.alias_key(namespace), image_id)
        results = pipe.execute()
        return cast(str, _text(results[1]))

    def put_shard(self, entries: ShardEntries) -> int:
        """Index every content row and alias of one shard (pipelined, first wins).

        Returns:
            How many entries this shard added (0: every content and alias was already indexed,
            the shard is referenced by nothing).
        """
        loc_key = self.loc_key(entries.model_version)
        pipe = self.client.pipeline(transaction=False)
        added = 0
        for i, (sha, row) in enumerate(entries.contents):
            pipe.hsetnx(loc_key, sha, _encode(Location(entries.name, row)))
            if i % _PIPELINE == _PIPELINE - 1:
                added += sum(int(x) for x in pipe.execute())
        for i, alias in enumerate(entries.aliases):
            pipe.hsetnx(self.alias_key(alias.namespace), alias.image_id, alias.content_sha256)
            if i % _PIPELINE == _PIPELINE - 1:
                added += sum(int(x) for x in pipe.execute())
        return added + sum(int(x) for x in pipe.execute())

    def relocate(self, moves: list[Move]) -> int:
        """Point entries at their new location when they still point at the old one.

        Returns:
            The number of entries moved (the others already pointed elsewhere).
        """
        moved = 0
        for start in range(0, len(moves), _PIPELINE):
            pipe = self.client.pipeline(transaction=False)
            for m in moves[start : start + _PIPELINE]:
                args = [m.content_sha256, _encode(m.old), _encode(m.new)]
                self._relocate(keys=[self.loc_key(m.model_version)], args=args, client=pipe)
            moved += sum(int(x) for x in pipe.execute())
        return moved

    def index_keys(self) -> list[str]:
        """Every key of this index (SCAN, never KEYS)."""
        found = self.client.scan_iter(match=f"{self.prefix}:*", count=1000)
        return sorted(cast(str, _text(k)) for k in found)

    def stats(self) -> dict[str, dict[str, int]]:
        """Entry counts: ``{"contents": {model_version: n}, "aliases": {namespace: n}}``."""
        out: dict[str, dict[str, int]] = {"contents": {}, "aliases": {}}
        for key in self.index_keys():
            kind, _, name = key[len(self.prefix) + 1 :].partition(":")
            bucket = {"loc": "contents", "alias": "aliases"}.get(kind)
            if bucket is not None:
                out[bucket][name] = int(self.client.hlen(key))
        return out


def reindex(
    store_dir: str | os.PathLike[str], client: redis.Redis, *, prefix: str = DEFAULT_PREFIX
) -> ReindexResult:
    """Rebuild the whole index from the shard files alone.

    Builds under a temporary prefix, replaying shards in ``(sealed_at, name)`` order, then
    renames each rebuilt key over the live one and deletes live keys that no shard supports.
    Entries written by live workers during the rebuild can be lost: run it with workers
    stopped, or run it again.
    """
    directory = Path(store_dir)
    staging = FeatureIndex(client, prefix=f"{prefix}:rebuild-{uuid.uuid4().hex}")
    entries = [scan_shard(directory, name) for name in list_shards(directory)]
    entries.sort(key=lambda e: (e.sealed_at, e.name))
    for e in entries:
        staging.put_shard(e)
    live = FeatureIndex(client, prefix=prefix)
    old_keys = {k for k in live.index_keys() if ":rebuild-" not in k}
    new_keys = set()
    for key in staging.index_keys():
        target = prefix + key[len(staging.prefix) :]
        client.rename(key, target)
        new_keys.add(target)
    if old_keys - new_keys:
        client.delete(*sorted(old_keys - new_keys))
    result = ReindexResult(
        shards=len(entries),
        contents=len({(e.model_version, sha) for e in entries for sha, _ in e.contents}),
        aliases=len({(a.namespace, a.image_id) for e in entries for a in e.aliases}),
    )
    logger.info("reindexed %s: %s", directory, result)
    return result
