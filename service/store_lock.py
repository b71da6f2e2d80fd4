"""One ``butd serve`` per store: an exclusive lock on ``STORE/butd-serve.lock``.

The embedded Redis keeps its append-only files under the store, and the workers seal into it;
two services on one store would replay and write the same files. ``butd serve`` therefore takes
an ``flock`` on the lock file before it starts anything, and writes who holds it (pid, host,
port) into the file. The kernel releases the lock when the process ends, however it ends
(kill -9 included), so a stale file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = "butd-serve.lock"


class StoreBusyError(RuntimeError):
    """Another ``butd serve`` holds the store; the message names it and the way out."""


def _holder(fd: int) -> str:
    """Who holds the lock, from the file (best effort: it may be mid-write)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "another butd serve"
    where = f"http://{info.get('host', '?')}:{info.get('port', '?')}"
    return f"butd serve pid {info.get('pid', '?')} on {where}"


@contextlib.contextmanager
def store_lock(store_dir: Path, *, host: str, port: int) -> Iterator[Path]:
    """Hold the store for this process while the block runs.

    Yields:
        The lock file's path.

    Raises:
        StoreBusyError: another process holds it; nothing was started.
    """
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(fd)
        os.close(fd)
        raise StoreBusyError(
            f"the store {store_dir} is in use by {holder} (lock {path}); one service per "
            "store. Stop that one, or start another with its own store and port: "
            "butd serve --store-dir OTHER_DIR --port OTHER_PORT"
        ) from None
    try:
        info = {"pid": os.getpid(), "host": host, "port": port, "started_at": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield path
    finally:
        os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
