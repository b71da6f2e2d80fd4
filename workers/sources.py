"""Where a task's image bytes are: one typed value per kind, parsed once from the wire.

The wire names an image with plain strings (``butd.workers.protocol``): an online entry's
``image_key`` (bytes the gateway stored in Redis) or ``path``, a job item's ``ref``. A worker
turns them into an ``ImageSource`` when it reads the entry (``online_source``, ``ref_source``)
and from then on dispatches on the type, never on the text:

* ``Uploaded(key)``: bytes held in Redis under ``key``, with a TTL (gone once it passed);
* ``LocalFile(path)``: a file on storage shared with the workers (must be absolute);
* ``ArchiveMember(archive, member)``: a member of a .zip / .tar(.gz) (``ARCHIVE::MEMBER``);
* ``ObjectUrl(url)``: an object in a bucket, or any fsspec URL (``s3://bucket/key``).

``str(source)`` is how failure reasons name it: the ref as the wire had it, ``redis:KEY`` for
uploaded bytes (the words reasons have always used).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from butd.store.objects import is_url, read_url
from butd.workers.files import DEFAULT_LIMITS, ReadLimits, read_file, read_member

ARCHIVE_SEPARATOR = "::"

FetchFn = Callable[[str], bytes | None]  # Redis GET of uploaded bytes (None when gone)


@dataclass(frozen=True)
class Uploaded:
    """Bytes the gateway stored in Redis under ``key`` (an online entry's ``image_key``)."""

    key: str

    def __str__(self) -> str:
        return f"redis:{self.key}"


@dataclass(frozen=True)
class LocalFile:
    """A file on storage shared with the workers; read only when absolute and regular."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class ArchiveMember:
    """A regular member of a .zip or .tar(.gz) archive on shared storage."""

    archive: Path
    member: str

    def __str__(self) -> str:
        return f"{self.archive}{ARCHIVE_SEPARATOR}{self.member}"


@dataclass(frozen=True)
class ObjectUrl:
    """An object in a bucket, or any fsspec URL (``butd.store.objects``)."""

    url: str

    def __str__(self) -> str:
        return self.url


ImageSource = Uploaded | LocalFile | ArchiveMember | ObjectUrl


def ref_source(ref: str) -> ImageSource:
    """The source a job item's ``ref`` (or an online entry's ``path``) names: a URL,
    ``ARCHIVE::MEMBER``, else a file path (checked to be absolute when read)."""
    if is_url(ref):
        return ObjectUrl(ref)
    if ARCHIVE_SEPARATOR in ref:
        archive, member = ref.split(ARCHIVE_SEPARATOR, 1)
        return ArchiveMember(Path(archive), member)
    return LocalFile(Path(ref))


def online_source(image_key: str, path: str) -> ImageSource:
    """The source of an online entry: its uploaded bytes when it has an ``image_key``."""
    return Uploaded(image_key) if image_key else ref_source(path)


def read_source(source: ImageSource, fetch: FetchFn, limits: ReadLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of ``source``; files and members only when regular, within ``limits``
    (``butd.workers.files``).

    Raises:
        FileNotFoundError, KeyError, OSError, ValueError: with a message naming the source.
    """
    match source:
        case Uploaded(key):
            data = fetch(key)
            if data is None:
                raise FileNotFoundError(f"uploaded bytes {key!r} are gone (TTL passed)")
            return data
        case ObjectUrl(url):
            return read_url(url)
        case ArchiveMember(archive, member):
            return read_member(archive, member, limits)
        case LocalFile(path):
            if not path.is_absolute():
                raise ValueError(f"image path must be absolute; got {str(path)!r}")
            return read_file(path, limits)
