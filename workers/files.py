"""Reading job images from storage: regular files only, size-capped, with a read timeout.

A job names files under the allowed roots; what sits there is not under our control. A FIFO
would block ``open`` / ``read`` forever, a device could stream without end, a hung network
mount could stall a read: each would stop the worker's loop on one item and, reclaimed by the
next worker, stop that one too. So ``read_file``:

* opens with ``O_NONBLOCK`` (a FIFO without a writer does not block the open), checks with
  ``fstat`` that the descriptor is a regular file (else ``NotRegularFileError`` naming its kind)
  and that its size is within ``max_bytes``;
* reads in a small pool of reader threads and waits at most ``timeout_s`` (``ReadTimeoutError``);
  a read that never returns keeps its thread, never the worker's loop. The pool is bounded, so
  a mount that hangs every read costs ``READERS`` threads, and later reads time out in turn.

Archive members (``ARCHIVE::MEMBER``) are read the same way: the archive must be a regular file,
the member a regular member within ``max_bytes``.
"""

from __future__ import annotations

import concurrent.futures
import os
import stat
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

READERS = 4
_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=READERS, thread_name_prefix="reader")

_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
}


class NotRegularFileError(OSError):
    """The path is a FIFO, device, socket or directory: never read."""


class ReadTimeoutError(OSError):
    """The read did not finish within the timeout."""


class FileTooLargeError(OSError):
    """The file (or archive member) is larger than the limit."""


@dataclass(frozen=True)
class ReadLimits:
    """How job files are read.

    Attributes:
        timeout_s: longest wait for one file's bytes, seconds.
        max_bytes: largest file or archive member read, bytes.
    """

    timeout_s: float = 10.0
    max_bytes: int = 64 * 1024 * 1024


DEFAULT_LIMITS = ReadLimits()


def read_file(path: Path, limits: ReadLimits) -> bytes:
    """The bytes of a regular file at ``path``, within ``limits``.

    Raises:
        NotRegularFileError, FileTooLargeError, ReadTimeoutError, OSError: with the path.
    """
    return _with_timeout(lambda: _read_regular(path, limits.max_bytes), path, limits.timeout_s)


def read_member(archive: Path, member: str, limits: ReadLimits) -> bytes:
    """The bytes of a regular member of a zip or tar archive, within ``limits``.

    Raises:
        KeyError: no such member, or not a regular member.
        NotRegularFileError, FileTooLargeError, ReadTimeoutError, OSError: as ``read_file``.
    """
    return _with_timeout(
        lambda: _read_member(archive, member, limits.max_bytes), archive, limits.timeout_s
    )


def _with_timeout(read: Callable[[], bytes], path: Path, timeout_s: float) -> bytes:
    future = _POOL.submit(read)
    try:
        return future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise ReadTimeoutError(f"reading {str(path)!r} took longer than {timeout_s:g} s") from None


def _check_regular(mode: int, path: Path) -> None:
    if not stat.S_ISREG(mode):
        kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
        raise NotRegularFileError(f"{str(path)!r} is {kind}; only regular files are read")


def _too_large(size: int, limit: int, what: str) -> FileTooLargeError:
    return FileTooLargeError(f"{what} is {size} bytes, more than the limit of {limit} bytes")


def _read_regular(path: Path, max_bytes: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode, path)
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        if info.st_size > max_bytes:
            raise _too_large(info.st_size, max_bytes, repr(str(path)))
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew while being read
        raise _too_large(len(data), max_bytes, repr(str(path)))
    return data


def _read_member(archive: Path, member: str, max_bytes: int) -> bytes:
    _check_regular(os.stat(archive).st_mode, archive)
    what = f"{member!r} in {archive}"
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            size = zf.getinfo(member).file_size
            if size > max_bytes:
                raise _too_large(size, max_bytes, what)
            with zf.open(member) as handle:
                data = handle.read(max_bytes + 1)
    else:
        with tarfile.open(archive) as tf:
            info = tf.getmember(member)
            if not info.isreg():
                raise KeyError(f"{what} is not a regular file")
            if info.size > max_bytes:
                raise _too_large(info.size, max_bytes, what)
            member_file = tf.extractfile(info)
            if member_file is None:
                raise KeyError(f"{what} is not a regular file")
            data = member_file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise _too_large(len(data), max_bytes, what)
    return data
