"""The gateway's composition root: ``create_app(settings) -> FastAPI``.

Reads like the request path: settings -> (lifespan) Redis queue + feature store -> request-id
and metrics middleware -> one router per resource -> one error mapping. Never imports torch
(nor ``detector`` / ``heads``): ``tests/unit/test_app_imports.py`` checks it.

Run it with ``butd serve`` or ``uvicorn --factory service.app:app_from_env``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio.to_thread
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.backend import FeatureStore, Queue
from service.errors import install_error_handlers
from service.heads_online import HeadsService
from service.metrics import Metrics
from service.online import ModelVersions, OnlineService, new_request_id
from service.routes import features, heads, health, jobs
from service.schemas import JobRequest
from service.settings import Settings, get_settings

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
    from service.adapters import RedisQueue, connect
    from service.shard_store import IndexedStore
    from store.index import FeatureIndex

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
    store = IndexedStore(
        settings.store_dir,
        FeatureIndex(client),
        max_open=settings.max_open_shards,
        cache_bytes=settings.record_cache_mib * 2**20,
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
    try:
        yield
    finally:
        if owned:
            for backend in (app.state.queue, app.state.store):
                close = getattr(backend, "close", None)
                if close is not None:
                    close()


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
    if queue is not None and store is not None:
        _wire(app, queue, store)
    app.add_middleware(RequestContext, metrics=app.state.metrics)
    install_error_handlers(app)
    for router in (features.router, heads.router, jobs.router, health.router):
        app.include_router(router)
    _publish_schemas(app, JobRequest)
    return app


def _publish_schemas(app: FastAPI, *models: type[BaseModel]) -> None:
    """Add models that routes name only by ``$ref`` in ``openapi_extra`` (POST /v1/jobs reads
    its body itself) to the spec's components; FastAPI adds only those it sees as parameters,
    and ReDoc refuses a spec with a dangling reference."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            _, defs = models_json_schema(
                [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
            )
            schemas = spec.setdefault("components", {}).setdefault("schemas", {})
            for name, schema in defs.get("$defs", {}).items():
                schemas.setdefault(name, schema)
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory service.app:app_from_env``."""
    return create_app(get_settings())
