"""``butd serve``: the HTTP gateway, plus an embedded Redis and worker when REDIS_URL is unset.

* ``REDIS_URL`` (or ``BUTD_REDIS_URL``) unset: start redis-server on a free 127.0.0.1 port with
  its data (AOF) under ``STORE_DIR/redis``, start ``--workers`` ``butd worker`` processes on it,
  then serve HTTP. Ctrl-C / SIGTERM stops uvicorn, then the workers (drained), then Redis.
* ``REDIS_URL`` set: serve HTTP only; workers run elsewhere (``butd worker``).

With the embedded Redis, the store is locked first (``butd.service.store_lock``): a second
``butd serve`` on the same store stops at once, before it starts redis-server or a worker, and
names the running one. Gateways on an external Redis (``REDIS_URL``) may share a store.

Never imports torch: the workers are separate processes.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path
from types import FrameType
from typing import Any

logger = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add ``butd serve``."""
    parser = subparsers.add_parser(
        "serve",
        help="run the HTTP gateway (with an embedded Redis and worker unless REDIS_URL is set)",
        description="Serve /v1/features, /v1/jobs, /health and /metrics. Settings come from "
        "BUTD_* environment variables (docs/service.md); these flags override them.",
    )
    parser.add_argument("--host", default=None, help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="listen port (default 8000)")
    parser.add_argument("--store-dir", type=Path, default=None, help="feature store directory")
    parser.add_argument(
        "--weights", default=None, help="embedded worker weights: registry name or file"
    )
    parser.add_argument("--device", default=None, help="embedded worker device: cpu, cuda:N")
    parser.add_argument(
        "--workers", type=int, default=1, help="embedded worker processes (default 1)"
    )
    parser.add_argument(
        "--redis-port", type=int, default=None, help="embedded Redis port (default: a free one)"
    )
    parser.set_defaults(handler=run_serve)


def _settings(args: argparse.Namespace) -> Any:
    from butd.service.settings import Settings

    overrides = {
        k: v
        for k, v in (
            ("host", args.host),
            ("port", args.port),
            ("store_dir", args.store_dir),
            ("weights", args.weights),
            ("device", args.device),
        )
        if v is not None
    }
    settings = Settings().model_copy(update=overrides)
    return settings.model_copy(update={"store_dir": settings.store_dir.resolve()})


class _Stopped(Exception):
    """SIGTERM arrived (uvicorn re-raises it after its own graceful shutdown)."""


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise _Stopped


def _serve_http(settings: Any) -> None:
    """Run uvicorn until SIGINT / SIGTERM; returns normally after its graceful shutdown.

    uvicorn handles the signal itself, then re-raises it to the previous handler: ours turns
    SIGTERM into ``_Stopped`` (the default action would kill the process before the embedded
    children are stopped) and Python's turns SIGINT into ``KeyboardInterrupt``.
    """
    import uvicorn

    from butd.service.app import create_app
    from butd.service.limits import uvicorn_limits

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        access_log=False,
        timeout_graceful_shutdown=10,
        **uvicorn_limits(settings),
    )
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        uvicorn.Server(config).run()
    except (_Stopped, KeyboardInterrupt):
        logger.info("gateway stopped by signal")
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_serve(args: argparse.Namespace) -> int:
    """Start what is needed, serve until a signal, stop the children in order."""
    from butd.service.store_lock import StoreBusyError, store_lock

    settings = _settings(args)
    settings.store_dir.mkdir(parents=True, exist_ok=True)
    if settings.redis_url:
        logger.info("REDIS_URL set: gateway only, on %s:%d", settings.host, settings.port)
        _serve_http(settings)
        return 0
    try:
        with store_lock(settings.store_dir, host=settings.host, port=settings.port):
            return _serve_embedded(args, settings)
    except StoreBusyError as exc:
        raise SystemExit(f"butd serve: {exc}") from None


def _serve_embedded(args: argparse.Namespace, settings: Any) -> int:
    """Redis and the workers on the store (held by this process), then HTTP on them."""
    from butd.service.embedded import EmbeddedStack, WorkerSpec

    spec = WorkerSpec(
        store_dir=settings.store_dir,
        weights=settings.weights,
        device=settings.device,
        count=max(args.workers, 0),
    )
    with EmbeddedStack(spec, redis_port=args.redis_port) as stack:
        logger.info("embedded redis %s, %d worker(s)", stack.redis_url, spec.count)
        _serve_http(settings.model_copy(update={"redis_url": stack.redis_url}))
    return 0
