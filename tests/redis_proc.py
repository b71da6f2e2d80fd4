"""A private redis-server for tests: free port, temp dir, never the shared instance.

Usage::

    proc = RedisProcess(appendonly=True)   # started, answers PING
    client = redis.Redis.from_url(proc.url)
    proc.restart()                         # same port and dir: an AOF survives
    proc.kill()                            # SIGKILL, as a crash would
    proc.stop()                            # SIGTERM, then removes the temp dir if we made it
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def redis_server_available() -> bool:
    """True when a ``redis-server`` binary is on PATH."""
    return shutil.which("redis-server") is not None


class RedisProcess:
    """A redis-server child process bound to 127.0.0.1 on a free port.

    Args:
        appendonly: turn the AOF on (``--appendonly yes --appendfsync everysec``).
        directory: working dir (AOF, log); a fresh temp dir, removed on ``stop()``, when None.
        port: TCP port; a free one when None.
        start_timeout: seconds to wait for PING to answer.
    """

    def __init__(
        self,
        *,
        appendonly: bool = False,
        directory: str | Path | None = None,
        port: int | None = None,
        start_timeout: float = 10.0,
    ) -> None:
        self._own_dir = directory is None
        self.dir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="butd-redis-"))
        self.port = port if port is not None else free_port()
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def client(self) -> redis.Redis:
        """A new client for this server."""
        return redis.Redis.from_url(self.url)

    def _argv(self) -> list[str]:
        argv = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--daemonize", "no",
            "--save", "",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.appendonly:
            argv += ["--appendonly", "yes", "--appendfsync", "everysec"]
        return argv

    def start(self) -> None:
        """Start the server (if not running) and wait until it answers PING."""
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            self._argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + self.start_timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited early; log: {self._log_tail()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError):
                    pass
                if time.monotonic() > deadline:
                    self._terminate(signal.SIGKILL)
                    raise RuntimeError(f"redis-server did not answer PING; log: {self._log_tail()}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"

    def _terminate(self, sig: int) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            os.kill(self._proc.pid, sig)
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        self._proc = None

    def restart(self) -> None:
        """Stop gracefully, then start again on the same port and dir (the AOF is replayed)."""
        self._terminate(signal.SIGTERM)
        self.start()

    def kill(self) -> None:
        """SIGKILL the server (a crash); ``start()`` brings it back on the same port and dir."""
        self._terminate(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM the server and remove the temp dir when this object created it."""
        self._terminate(signal.SIGTERM)
        if self._own_dir:
            with contextlib.suppress(OSError):
                shutil.rmtree(self.dir)

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
