"""Object storage through fsspec: job sources, export targets and a bucket of sealed shards.

Any fsspec URL works (``s3://bucket/prefix``, ``gs://``, ``file://``, ...); ``s3://`` needs the
``s3`` extra (s3fs). Credentials and the endpoint come from the standard environment of that
store (for S3: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION``, profiles, instance roles): nothing butd-specific.

Shards in a bucket (``BucketShards``): a worker seals a shard under a temp name in its local
staging directory exactly as before (``butd.store.shards.seal_shard``), uploads it as
``<url>/<name>`` (one PUT: an object is either absent or complete, never half-written), deletes
the local copy, and only then indexes it. Objects are never rewritten: a shard name is unique
(``<worker>-<seq>-<uuid>.h5``). ``BucketShardReaders`` opens each shard lazily as a read-only
file object (``RangedFile``) whose reads are ranged GETs through a small block cache
(``block_size`` bytes per block, ``max_blocks`` per open shard), so a GET by id fetches the
shard's metadata once per open handle and then only the blocks holding that image's rows.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
from fsspec.caching import BlockCache
from fsspec.core import url_to_fs

from butd.store.h5 import FeatureFile
from butd.store.shards import ShardMissingError, ShardReaders

logger = logging.getLogger(__name__)

# scheme://... as fsspec spells its URLs (s3://, gs://, file://, memory://, simplecache::s3://).
_URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
# Ranged-read block of a shard opened from a bucket, bytes: a feature chunk of the shard layout
# is ~256 KiB, so a 36-100 region image spans one to three blocks (bench/objects.py).
DEFAULT_BLOCK_SIZE = 256 * 1024
# Blocks kept per open shard (the metadata blocks and the last rows read): 2 MiB per handle.
DEFAULT_MAX_BLOCKS = 8


def is_url(ref: str) -> bool:
    """True for an fsspec URL (``s3://bucket/key``), False for a local path."""
    return bool(_URL.match(ref))


def join(url: str, *parts: str) -> str:
    """``url`` with ``parts`` appended, one ``/`` between each."""
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


class ObjectStoreUnavailableError(RuntimeError):
    """The store did not answer or failed (not a missing or forbidden object): whatever
    needed the object should be retried later, not failed."""


def read_url(url: str) -> bytes:
    """The whole object at ``url``.

    Raises:
        FileNotFoundError, PermissionError, IsADirectoryError: that object cannot be had (the
            item that names it fails, with this reason).
        ObjectStoreUnavailableError: anything else (endpoint unreachable, throttling, 5xx):
            not the object's fault, so it is not an ``OSError`` a caller would fail it for.
    """
    fs, path = url_to_fs(url)
    try:
        data: bytes = fs.cat_file(path)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as exc:
        raise ObjectStoreUnavailableError(f"cannot read {url!r}: {exc}") from exc
    return data


def list_files(url: str, suffixes: Sequence[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """Objects under the prefix ``url`` (recursively), sorted by key.

    Returns:
        ``([(object url, image id)], [skipped ids])``: the id is the key relative to the prefix
        (``a/b.jpg``), or the object's name when ``url`` is one object; keys whose suffix is not
        in ``suffixes`` (case-insensitive) are skipped.

    Raises:
        FileNotFoundError: nothing under ``url``.
    """
    fs, root = url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if fs.isfile(root):
        keys = [root]
        base = str(PurePosixPath(root).parent)
    else:
        keys = sorted(fs.find(root))
        base = root.rstrip("/")
    if not keys:
        raise FileNotFoundError(f"no object under {url!r}")
    wanted = {s.lower() for s in suffixes}
    found, skipped = [], []
    for key in keys:
        image_id = key[len(base) :].lstrip("/")
        if PurePosixPath(key).suffix.lower() not in wanted:
            skipped.append(image_id)
            continue
        found.append((f"{protocol}://{key}", image_id))
    return found, skipped


def put_file(local: str | os.PathLike[str], url: str) -> None:
    """Upload one local file to ``url`` (one object; a multipart upload for a large file)."""
    fs, path = url_to_fs(url)
    fs.put_file(str(local), path)


class BucketShards:
    """Sealed shards as immutable objects under ``url`` (``s3://bucket/prefix``).

    Args:
        url: the prefix the shards live under (no trailing slash needed).
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = url_to_fs(self.url)

    def upload(self, local: Path) -> None:
        """Upload the sealed shard ``local`` as ``<url>/<its name>``, then delete it locally
        (also when the upload fails: the caller leaves its entries pending, to be recomputed)."""
        try:
            self.fs.put_file(str(local), f"{self.root}/{local.name}")
        finally:
            local.unlink()
        logger.debug("uploaded shard %s to %s", local.name, self.url)

    def delete(self, name: str) -> None:
        """Delete the shard ``name`` (one that nothing in the index references)."""
        self.fs.rm_file(f"{self.root}/{name}")
        logger.debug("deleted shard %s from %s", name, self.url)

    def names(self) -> list[str]:
        """Shard names in the bucket, sorted."""
        return sorted(PurePosixPath(p).name for p in self.fs.find(self.root) if p.endswith(".h5"))

    def open(self, name: str, *, block_size: int, max_blocks: int) -> RangedFile:
        """A read-only file object on one shard whose reads are cached ranged GETs.

        Raises:
            ShardMissingError: no such object.
        """
        path = f"{self.root}/{name}"
        try:
            size = int(self.fs.size(path))
        except FileNotFoundError as err:
            raise ShardMissingError(f"shard {name!r} is not in {self.url}") from err
        return RangedFile(self.fs, path, size, block_size=block_size, max_blocks=max_blocks)


class RangedFile(io.RawIOBase):
    """A seekable, read-only view of one object: each read is served from a block cache whose
    misses are ranged reads (``fs.cat_file(path, start, end)``: one ranged GET on S3).

    ``fetched_bytes`` and ``gets`` count what came from the store.
    """

    def __init__(self, fs: Any, path: str, size: int, *, block_size: int, max_blocks: int) -> None:
        super().__init__()
        self.path, self.size = path, size
        self._fs = fs
        self._cache = BlockCache(block_size, self._fetch, size, maxblocks=max_blocks)
        self._pos = 0
        self.fetched_bytes = 0
        self.gets = 0

    def _fetch(self, start: int, end: int) -> bytes:
        data: bytes = self._fs.cat_file(self.path, start=start, end=end)
        self.fetched_bytes += len(data)
        self.gets += 1
        return data

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        end = min(self._pos + len(view), self.size)
        if end <= self._pos:
            return 0
        data = self._cache._fetch(self._pos, end)
        view[: len(data)] = data
        self._pos += len(data)
        return len(data)


class BucketShardReaders(ShardReaders):
    """``ShardReaders`` over a ``BucketShards`` prefix: the same LRU of open handles, each a
    block-cached remote file. ``bytes_fetched`` and ``gets`` count the bytes and the ranged
    GET requests fetched from the store so far.

    Args:
        shards: the bucket prefix.
        max_open: most shards open at once.
        block_size: bytes per ranged GET (one cache block).
        max_blocks: cached blocks per open shard.
    """

    def __init__(
        self,
        shards: BucketShards,
        *,
        max_open: int = 64,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int = DEFAULT_MAX_BLOCKS,
    ) -> None:
        super().__init__(shards.url, max_open=max_open)
        self.shards = shards
        self.block_size = block_size
        self.max_blocks = max_blocks
        self._files: dict[int, RangedFile] = {}
        self._closed_bytes = 0
        self._closed_gets = 0

    def _open(self, shard: str) -> FeatureFile:
        fh = self.shards.open(shard, block_size=self.block_size, max_blocks=self.max_blocks)
        ff = FeatureFile(f"{self.shards.url}/{shard}", fileobj=fh)
        self._files[id(ff)] = fh
        return ff

    def _closed(self, ff: FeatureFile) -> None:
        fh = self._files.pop(id(ff), None)
        if fh is not None:
            self._closed_bytes += fh.fetched_bytes
            self._closed_gets += fh.gets
            fh.close()

    @property
    def bytes_fetched(self) -> int:
        """Bytes fetched from the store by every handle opened so far."""
        open_bytes = sum(fh.fetched_bytes for fh in self._files.values())
        return self._closed_bytes + open_bytes

    @property
    def gets(self) -> int:
        """Ranged GET requests (cache-block misses) made by every handle opened so far."""
        return self._closed_gets + sum(fh.gets for fh in self._files.values())


def open_readers(
    directory: str | os.PathLike[str], url: str | None, *, max_open: int = 64
) -> ShardReaders:
    """Readers of the sealed shards: in the bucket ``url`` when set, else in ``directory``."""
    if url:
        return BucketShardReaders(BucketShards(url), max_open=max_open)
    return ShardReaders(directory, max_open=max_open)


def ensure_filesystem(url: str) -> None:
    """Fail early (at start) when the URL's filesystem is not installed (e.g. s3fs)."""
    fsspec.get_filesystem_class(fsspec.utils.get_protocol(url))
