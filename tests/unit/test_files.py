"""Job files are read only when regular, within a size cap and a read timeout."""

from __future__ import annotations

import io
import os
import socket
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest

from butd.workers.batcher import Task, load_task
from butd.workers.files import (
    FileTooLargeError,
    NotRegularFileError,
    ReadLimits,
    ReadTimeoutError,
    _with_timeout,
    read_file,
    read_member,
)
from butd.workers.options import ExtractOptions
from butd.workers.queue import Entry
from butd.workers.sources import LocalFile

LIMITS = ReadLimits(timeout_s=5.0, max_bytes=1000)


def test_a_regular_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 1000)
    assert read_file(path, LIMITS) == b"x" * 1000


def test_a_fifo_fails_at_once_naming_its_kind(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # no writer: a plain open() would block forever
    with pytest.raises(NotRegularFileError, match="FIFO"):
        read_file(fifo, LIMITS)


def test_a_socket_a_device_and_a_directory_are_refused(tmp_path: Path) -> None:
    sock_path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(sock_path))
        with pytest.raises(OSError, match=r"socket|No such device"):
            read_file(sock_path, LIMITS)
    with pytest.raises(NotRegularFileError, match="character device"):
        read_file(Path("/dev/zero"), LIMITS)  # would stream zeros without end
    with pytest.raises(NotRegularFileError, match="directory"):
        read_file(tmp_path, LIMITS)


def test_a_file_over_the_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 1001)
    with pytest.raises(FileTooLargeError, match=r"1001 bytes, more than the limit of 1000"):
        read_file(path, LIMITS)


def test_a_read_that_never_returns_times_out() -> None:
    release = threading.Event()
    try:
        with pytest.raises(ReadTimeoutError, match=r"longer than 0\.2 s"):
            _with_timeout(lambda: bytes(release.wait(60)), Path("/hung/mount"), 0.2)
    finally:
        release.set()


def test_archive_members_regular_and_capped(tmp_path: Path) -> None:
    tar_path = tmp_path / "a.tar"
    with tarfile.open(tar_path, "w") as tf:
        for name, data in (("ok.jpg", b"y" * 10), ("big.jpg", b"z" * 2000)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        fifo = tarfile.TarInfo("pipe.jpg")
        fifo.type = tarfile.FIFOTYPE
        tf.addfile(fifo)
    assert read_member(tar_path, "ok.jpg", LIMITS) == b"y" * 10
    with pytest.raises(FileTooLargeError):
        read_member(tar_path, "big.jpg", LIMITS)
    with pytest.raises(KeyError, match="not a regular file"):
        read_member(tar_path, "pipe.jpg", LIMITS)
    zip_path = tmp_path / "a.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("big.jpg", b"z" * 2000)
    with pytest.raises(FileTooLargeError):
        read_member(zip_path, "big.jpg", LIMITS)


def test_load_task_turns_a_fifo_into_the_items_reason(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    task = Task(Entry("butd:jobs", "1-0", {}), "pipe", "ns", ExtractOptions(), LocalFile(fifo))
    loaded = load_task(task, lambda key: None, max_pixels=100, limits=LIMITS)
    assert not loaded.ok and "FIFO" in loaded.reason and str(fifo) in loaded.reason
