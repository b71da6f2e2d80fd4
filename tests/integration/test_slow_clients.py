"""Slow clients are cut off: a trickled request head, a trickled body, too many connections.

A real uvicorn server (``butd.service.limits.uvicorn_limits``, as ``butd serve`` runs it) on a free
port, the gateway on the test's private redis-server; no worker is needed (nothing here gets
past reading the request). Waits are event-driven with generous bounds: each test only needs
the server to act at some point, never within a tight time.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from butd.service.app import create_app
from butd.service.limits import uvicorn_limits
from butd.service.settings import Settings
from tests.redis_proc import free_port

GENEROUS_S = 60.0


@pytest.fixture
def server(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Factory: start the gateway under uvicorn with settings overrides; returns host:port."""
    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(**overrides: object) -> str:
        values: dict[str, object] = {"redis_url": redis_url, "store_dir": tmp_path / "store"}
        values.update(overrides)
        settings = Settings(**values)  # type: ignore[arg-type]
        port = free_port()
        config = uvicorn.Config(
            create_app(settings), host="127.0.0.1", port=port, log_level="warning",
            **uvicorn_limits(settings),
        )  # fmt: skip
        srv = uvicorn.Server(config)
        thread = threading.Thread(target=srv.run, daemon=True)
        thread.start()
        servers.append((srv, thread))
        deadline = time.monotonic() + GENEROUS_S
        while not srv.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.05)
        return f"127.0.0.1:{port}"

    yield start
    for srv, thread in servers:
        srv.should_exit = True
        thread.join(timeout=30)


def connect(address: str) -> socket.socket:
    host, port = address.split(":")
    sock = socket.create_connection((host, int(port)), timeout=GENEROUS_S)
    sock.settimeout(0.2)
    return sock


def trickle_until_answered(sock: socket.socket, pieces: Iterator[bytes]) -> bytes:
    """Send one piece every 0.2 s until the server answers and closes; all it sent."""
    received = b""
    deadline = time.monotonic() + GENEROUS_S
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
            if not chunk:
                return received  # closed by the server
            received += chunk
            continue
        except TimeoutError:
            pass
        except ConnectionResetError:
            return received
        try:
            sock.sendall(next(pieces))
        except (BrokenPipeError, ConnectionResetError):
            return received + _drain(sock)
    pytest.fail(f"the server kept a trickling client for {GENEROUS_S} s; got {received!r}")


def _drain(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except OSError:
        return b""


def forever(piece: bytes) -> Iterator[bytes]:
    while True:
        yield piece


def test_a_slow_request_head_is_cut_off_with_408(server: Callable[..., str]) -> None:
    address = server(header_timeout_s=1.0)
    with connect(address) as sock:
        sock.sendall(b"POST /v1/features HTTP/1.1\r\nHost: x\r\n")
        answer = trickle_until_answered(sock, forever(b"X-Slow: a\r\n"))
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b"header_timeout" in answer


def test_a_trickling_upload_is_cut_off_with_408(server: Callable[..., str]) -> None:
    address = server(header_timeout_s=GENEROUS_S, body_timeout_s=1.0)
    head = (
        b"POST /v1/features HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Content-Length: 100000\r\n\r\n"
    )
    with connect(address) as sock:
        sock.sendall(head)
        answer = trickle_until_answered(sock, forever(b"\x89"))
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"error":"body_timeout"' in answer and b"BUTD_BODY_TIMEOUT_S" in answer


def test_connections_past_the_limit_get_503_until_idle_ones_are_cut(
    server: Callable[..., str],
) -> None:
    address = server(max_connections=3, header_timeout_s=2.0)
    idle = [connect(address) for _ in range(3)]  # connected, never sending a byte
    try:
        deadline = time.monotonic() + GENEROUS_S
        refused = httpx.get(f"http://{address}/health/live", timeout=GENEROUS_S)
        assert refused.status_code == 503
        while httpx.get(f"http://{address}/health/live", timeout=GENEROUS_S).status_code != 200:
            assert time.monotonic() < deadline, "idle connections were never closed"
            time.sleep(0.2)
        assert all(_drain(sock).startswith(b"HTTP/1.1 408") for sock in idle)
    finally:
        for sock in idle:
            sock.close()
