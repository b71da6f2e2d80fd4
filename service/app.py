"""The gateway's composition root: ``create_app(settings) -> FastAPI``.

Reads like the request path: settings -> (lifespan) Redis queue + feature store -> request-id
and metrics middleware -> one router per resource -> one error mapping. Never imports torch
(nor ``detector`` / ``heads``): ``tests/unit/test_app_imports.py`` checks it.

Run it with ``butd serve`` or ``uvicorn --factory butd.service.app:app_from_env``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from butd.service.backend import FeatureStore, Queue
from butd.service.errors import install_error_handlers
from butd.service.heads_online import HeadsService
from butd.service.job_uploads import UploadArea
from butd.service.limits import BodyDeadline
from butd.service.metrics import Metrics
from butd.service.online import ModelVersions, OnlineService, new_request_id
from butd.service.openapi import install_openapi
from butd.service.routes import exports, features, heads, health, jobs
from butd.service.settings import Settings, get_settings

logger = logging.getLogger(__name__)

_CLIENT_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable ASCII, no spaces


class RequestContext:
    """ASGI middleware: a request id per request, echoed headers, per-route metrics.

    Sets ``request.state.request_id`` (a fresh uuid), answers with ``X-Request-ID`` and echoes
    the client's ``Idempotency-Key`` (when printable), then counts the response under its
    route template (``/v1/jobs/{job_id}``, not the concrete path).
    """

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        echo = _echo_headers(scope, request_id)
        start = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), *echo]
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.observe_response(
                route, scope["method"], status, time.perf_counter() - start
            )


def _echo_headers(scope: Scope, request_id: str) -> list[tuple[bytes, bytes]]:
    out = [(b"x-request-id", request_id.encode())]
    for name, value in scope.get("headers", []):
        if name == b"idempotency-key" and _CLIENT_ID.match(value.decode("latin-1")):
            out.append((b"idempotency-key", value))
    return out


def _default_backends(settings: Settings) -> tuple[Queue, FeatureStore]:
    """The real queue (Redis) and store (sealed shards + index) named by ``settings``."""
    from butd.service.adapters import RedisQueue, connect
    from butd.store.index import FeatureIndex
    from butd.store.shard_store import StoreReader

    if not settings.redis_url:
        raise RuntimeError("REDIS_URL is not set (butd serve starts an embedded Redis)")
    client = connect(settings.redis_url, max_connections=64)
    blocking = connect(
        settings.redis_url,
        max_connections=settings.max_queue_depth + 16,
        socket_timeout=settings.request_timeout_s + 10,
    )
    queue = RedisQueue(
        client,
        blocking,
        heartbeat_max_age_s=settings.heartbeat_max_age_s,
        job_shard_size=settings.job_shard_size,
        image_ttl_s=int(settings.request_timeout_s + settings.compute_grace_s) + 60,
    )
    store = StoreReader(
        settings.store_dir,
        FeatureIndex(client),
        max_open=settings.max_open_shards,
        cache_bytes=settings.record_cache_mib * 2**20,
        store_url=settings.store_url,
    )
    return queue, store


def _wire(app: FastAPI, queue: Queue, store: FeatureStore) -> None:
    """Put the backends and the online service on ``app.state``."""
    settings: Settings = app.state.settings
    app.state.queue = queue
    app.state.store = store
    app.state.metrics.bind(queue)
    models = ModelVersions(queue, settings.model_version, settings.worker_cache_s)
    app.state.online = OnlineService(queue, store, settings, app.state.metrics, models)
    app.state.heads = HeadsService(queue, settings, models)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Connect Redis and open the store (unless injected); size the thread pool."""
    settings: Settings = app.state.settings
    limiter = anyio.to_thread.current_default_thread_limiter()
    limiter.total_tokens = max(limiter.total_tokens, settings.max_queue_depth + 16)
    owned = getattr(app.state, "queue", None) is None
    if owned:
        _wire(app, *_default_backends(settings))
    logger.info("gateway up: redis %s, store %s", settings.redis_url, settings.store_dir)
    sweeper = asyncio.create_task(_sweep_uploads(app))
    try:
        yield
    finally:
        sweeper.cancel()
        if owned:
            for backend in (app.state.queue, app.state.store):
                close = getattr(backend, "close", None)
                if close is not None:
                    close()


async def _sweep_uploads(app: FastAPI) -> None:
    """Every ``upload_sweep_s``: remove the uploaded archives of ended (or unknown) jobs."""
    settings: Settings = app.state.settings
    area: UploadArea = app.state.uploads

    def state(job_id: str) -> str | None:
        found = app.state.queue.job_status(job_id)
        return None if found is None else str(found.state)

    while True:
        try:
            removed = await anyio.to_thread.run_sync(area.sweep, state)
            if removed:
                logger.info("removed %d uploads of ended jobs", removed)
        except Exception:  # a Redis hiccup: try again next time
            logger.warning("sweeping job uploads failed", exc_info=True)
        await asyncio.sleep(settings.upload_sweep_s)


def create_app(
    settings: Settings | None = None,
    *,
    queue: Queue | None = None,
    store: FeatureStore | None = None,
) -> FastAPI:
    """Build the gateway.

    Args:
        settings: configuration; ``get_settings()`` (the environment) when None.
        queue, store: injected backends (tests); when None the lifespan connects to
            ``settings.redis_url`` and opens ``settings.store_dir``.
    """
    settings = settings or get_settings()
    # /docs and /redoc with the Swagger UI and ReDoc files fastapi-offline installs (no CDN).
    app = FastAPIOffline(
        title="butd",
        summary="Bottom-up region features (Faster R-CNN R101 C4 + attributes) as a service",
        version="0.1.0",
        lifespan=_lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.queue = None
    app.state.uploads = UploadArea(
        settings.jobs_upload_dir,
        budget_bytes=settings.max_pending_upload_bytes,
        grace_s=settings.upload_grace_s,
        retry_after_s=max(settings.retry_after_s, 30),
    )
    if queue is not None and store is not None:
        _wire(app, queue, store)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    install_error_handlers(app)
    routers = (features.router, heads.router, jobs.router, exports.router, health.router)
    for router in routers:
        app.include_router(router)
    install_openapi(app)
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory butd.service.app:app_from_env``."""
    return create_app(get_settings())
