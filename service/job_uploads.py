"""Uploaded job archives on disk: a budget while they wait, one directory per job, and cleanup.

Layout under ``Settings.jobs_upload_dir``:

* ``.incoming/UUID.upload``: an archive being received (deleted once unpacked or refused);
* ``JOB_ID.NONCE/``: one upload's unpacked files, its own directory, so no later request (a
  reused ``Idempotency-Key`` among them) can touch the files of a running job.

Budget: the bytes under the upload area (archives being received plus unpacked jobs not yet
finished) never exceed ``max_pending_upload_bytes``. A new upload is admitted only if its
declared size (or ``max_archive_bytes`` when it declares none) fits beside what is there and what
the uploads in flight have reserved; otherwise ``UploadsFullError`` (507 + Retry-After). The
unpacked size of an archive is capped by what is left of the budget as well.

Cleanup: ``sweep`` removes the directory of every job that ended (done, failed, cancelled) or
that the queue does not know after ``grace_s`` (a refused or crashed submission), and stale
incoming archives. The gateway sweeps on a timer, before refusing an upload for lack of room,
and when a job's status is read or it is cancelled (``discard``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from butd.service.errors import ServiceError
from butd.workers.protocol import TERMINAL_STATES

logger = logging.getLogger(__name__)

_INCOMING = ".incoming"

StateFn = Callable[[str], str | None]  # job id -> its state, None when unknown


class UploadsFullError(ServiceError):
    """The disk budget of pending uploads is used up: retry after the running jobs finish."""

    status_code = 507
    code = "uploads_full"

    def __init__(self, detail: str, *, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (0 when it does not exist)."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


class UploadArea:
    """The upload directory of the store, with its byte budget (one per gateway process).

    Args:
        root: ``Settings.jobs_upload_dir``.
        budget_bytes: most bytes of pending uploads (archives and unpacked files).
        grace_s: age after which a directory of a job the queue does not know is removed, s.
        retry_after_s: Retry-After of a 507.
    """

    def __init__(
        self, root: Path, *, budget_bytes: int, grace_s: float = 600.0, retry_after_s: int = 60
    ) -> None:
        self.root = root
        self.budget_bytes = budget_bytes
        self.grace_s = grace_s
        self.retry_after_s = retry_after_s
        self._reserved = 0
        self._lock = threading.Lock()

    def used_bytes(self) -> int:
        """Bytes on disk under the upload area now."""
        return _tree_bytes(self.root)

    def acquire(self, nbytes: int, job_state: StateFn | None = None) -> int:
        """Reserve ``nbytes`` of the budget for one upload (``release`` it when done).

        Returns:
            The bytes the upload may take in all (archive + unpacked files): what the budget
            has left beside everything else, ``nbytes`` at least.

        Raises:
            UploadsFullError: the reservation does not fit, even after a sweep (507).
        """
        left = self._try_reserve(nbytes)
        if left is None and job_state is not None:
            self.sweep(job_state)
            left = self._try_reserve(nbytes)
        if left is None:
            raise UploadsFullError(
                f"pending job uploads would pass their disk budget of {self.budget_bytes} bytes "
                f"(BUTD_MAX_PENDING_UPLOAD_BYTES) with this upload of up to {nbytes} bytes; "
                "retry when running jobs have finished",
                retry_after_s=self.retry_after_s,
            )
        return left

    def release(self, nbytes: int) -> None:
        """Give back a reservation of ``acquire``."""
        with self._lock:
            self._reserved -= nbytes

    def _try_reserve(self, nbytes: int) -> int | None:
        with self._lock:
            left = self.budget_bytes - self.used_bytes() - self._reserved
            if nbytes > left:
                return None
            self._reserved += nbytes
            return left

    def incoming(self) -> Path:
        """A fresh path to receive one archive at."""
        directory = self.root / _INCOMING
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"{uuid.uuid4().hex}.upload"

    def job_dir(self, job_id: str) -> Path:
        """A new directory of its own for one upload of ``job_id`` (not created)."""
        return self.root / f"{job_id}.{uuid.uuid4().hex[:12]}"

    def discard(self, job_id: str) -> int:
        """Remove every upload directory of ``job_id``; returns how many."""
        found = [p for p in self.root.glob(f"{job_id}.*") if p.is_dir() and _job_of(p) == job_id]
        for path in found:
            shutil.rmtree(path, ignore_errors=True)
            logger.info("removed the upload of job %s (%s)", job_id, path.name)
        return len(found)

    def sweep(self, job_state: StateFn, now: float | None = None) -> int:
        """Remove the uploads of ended or unknown (older than ``grace_s``) jobs; returns count."""
        now = time.time() if now is None else now
        removed = 0
        if not self.root.is_dir():
            return 0
        for path in self.root.iterdir():
            old = now - _mtime(path) > self.grace_s
            if path.name == _INCOMING:
                removed += sum(_remove(p) for p in path.iterdir() if now - _mtime(p) > self.grace_s)
                continue
            state = job_state(_job_of(path))
            if (state is None and old) or (state is not None and state in TERMINAL_STATES):
                removed += _remove(path)
        return removed


def _job_of(path: Path) -> str:
    return path.name.rsplit(".", 1)[0]


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> int:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
    logger.info("removed finished or stale upload %s", path.name)
    return 1
