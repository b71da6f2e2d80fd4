"""One-command serving: an embedded redis-server and worker subprocesses for ``butd serve``.

``EmbeddedStack`` starts, in order, a redis-server on a free 127.0.0.1 port (data dir under the
store, AOF on, ``noeviction``) and N ``butd worker`` processes pointed at it, and stops them in
the reverse order: workers first (SIGTERM: they finish the batch in hand and ack), then Redis
(SIGTERM: it flushes the AOF). Children run in their own session, so a Ctrl-C in the terminal
reaches only ``butd serve``, which then stops them in that order.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

logger = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Child:
    """A named subprocess stopped with SIGTERM, then SIGKILL after ``grace_s``."""

    def __init__(self, name: str, argv: list[str], *, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log_path = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log = log.open("ab")
        self.proc = subprocess.Popen(
            argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        logger.info("started %s (pid %d), log %s", name, self.proc.pid, log)

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc.poll() is None

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s: killing it", self.name, grace_s)
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        logger.info("%s stopped (exit %s)", self.name, self.proc.returncode)
        return self.proc.returncode


class RedisServer(Child):
    """The embedded redis-server child; ``url`` is where it listens."""

    def __init__(self, argv: list[str], *, port: int, log: Path) -> None:
        super().__init__("redis-server", argv, env=dict(os.environ), log=log)
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"


def start_redis(data_dir: Path, *, port: int | None = None, timeout_s: float = 10.0) -> RedisServer:
    """A redis-server with append-only persistence in ``data_dir``, answering PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH: install it, or set REDIS_URL")
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv = [
        binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
        "--maxmemory-policy", "noeviction", "--daemonize", "no",
    ]  # fmt: skip
    server = RedisServer(argv, port=port, log=data_dir / "redis.log")
    _wait_for_redis(server, port, timeout_s)
    return server


def _wait_for_redis(child: Child, port: int, timeout_s: float) -> None:
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if not child.alive():
                raise RuntimeError(f"redis-server exited; see {child.log_path}")
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                time.sleep(0.05)
        child.stop(grace_s=2)
        raise RuntimeError(f"redis-server did not answer in {timeout_s:g} s; see {child.log_path}")
    finally:
        client.close()


@dataclass(frozen=True)
class WorkerSpec:
    """How to start the embedded workers (values become their BUTD_* environment)."""

    store_dir: Path
    weights: str
    device: str
    count: int = 1
    extra_env: dict[str, str] = field(default_factory=dict)


def start_worker(redis_url: str, spec: WorkerSpec, index: int) -> Child:
    """One worker subprocess (same interpreter, settings by environment) on ``redis_url``."""
    env = dict(os.environ)
    env.update(
        BUTD_REDIS_URL=redis_url,
        REDIS_URL=redis_url,
        BUTD_STORE_DIR=str(spec.store_dir),
        BUTD_WEIGHTS=spec.weights,
        BUTD_DEVICE=spec.device,
        BUTD_WORKER_ID=f"{socket.gethostname()}-embedded-{index}",
        **spec.extra_env,
    )
    argv = [sys.executable, "-m", "butd.workers.worker"]  # the same loop as ``butd worker``
    log = spec.store_dir / "logs" / f"worker-{index}.log"
    return Child(f"worker-{index}", argv, env=env, log=log)


class EmbeddedStack:
    """redis-server + workers for ``butd serve`` without REDIS_URL (a context manager).

    Attributes:
        redis_url: URL of the embedded server once started.
    """

    def __init__(self, spec: WorkerSpec, *, redis_port: int | None = None) -> None:
        self.spec = spec
        self.redis_port = redis_port
        self.redis: RedisServer | None = None
        self.workers: list[Child] = []
        self.redis_url = ""
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None

    def start(self) -> EmbeddedStack:
        """Start Redis, then the workers."""
        self.redis = start_redis(self.spec.store_dir / "redis", port=self.redis_port)
        self.redis_url = self.redis.url
        for i in range(self.spec.count):
            self.workers.append(start_worker(self.redis_url, self.spec, i))
        self._watch = threading.Thread(target=self._watch_children, name="embedded", daemon=True)
        self._watch.start()
        return self

    def _watch_children(self, period_s: float = 2.0) -> None:
        """Log (once per child) a child that exits while the stack is up, with its log path."""
        reported: set[str] = set()
        while not self._stopping.wait(period_s):
            children = [*self.workers, *([self.redis] if self.redis else [])]
            for child in children:
                if child.name not in reported and not child.alive():
                    reported.add(child.name)
                    logger.error(
                        "%s exited with code %s; see %s",
                        child.name,
                        child.proc.returncode,
                        child.log_path,
                    )

    def stop(self) -> None:
        """Stop the workers (graceful drain), then Redis."""
        self._stopping.set()
        for worker in self.workers:
            worker.stop()
        self.workers = []
        if self.redis is not None:
            self.redis.stop(grace_s=10)
            self.redis = None

    def __enter__(self) -> EmbeddedStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
