"""Domain errors of the gateway and their one mapping to HTTP.

Routes and helpers raise the exception that names the problem (with the rule and the value in
its message); ``install_error_handlers`` turns each into a status code and a JSON body
``{"error": CODE, "detail": MESSAGE, "request_id": ID?}``. Image errors come from
``butd.images``, name errors from ``butd.store.ids`` and export errors from the store's front
door ``butd.store.shard_store``; they are mapped here as well, so there is exactly one table.
"""

from __future__ import annotations

import logging
from typing import Any

import redis.exceptions
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from butd.images import ImageError, NotAnImageError, TooManyPixelsError, TruncatedImageError
from butd.store.ids import InvalidNameError
from butd.store.shard_store import ExportRefusedError, NothingStoredError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the gateway's errors; subclasses set ``status_code`` and ``code``."""

    status_code = 500
    code = "internal"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(detail)
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra


class BodyTooLargeError(ServiceError):
    """The request body exceeds ``max_body_bytes``."""

    status_code = 413
    code = "body_too_large"


class UnsupportedMediaError(ServiceError):
    """The request carries no image part or an unsupported content type."""

    status_code = 415
    code = "unsupported_media_type"


class InvalidRequestError(ServiceError):
    """A parameter outside its range, a malformed body or archive."""

    status_code = 422
    code = "invalid_request"


class PathNotAllowedError(ServiceError):
    """A job path that resolves outside ``allowed_roots``."""

    status_code = 403
    code = "path_not_allowed"


class BodyTimeoutError(ServiceError):
    """The request body did not arrive within ``body_timeout_s`` (a slow or stalled upload)."""

    status_code = 408
    code = "body_timeout"


class NotFoundError(ServiceError):
    """No cached record, job or export for the given key."""

    status_code = 404
    code = "not_found"


class ConflictError(ServiceError):
    """An image id already bound to other image bytes (aliases are first-wins)."""

    status_code = 409
    code = "conflict"


class IdempotencyKeyReusedError(ConflictError):
    """An Idempotency-Key already used with a different request."""

    code = "idempotency_key_reused"


class IdempotencyKeyInProgressError(ConflictError):
    """The first request with this Idempotency-Key has not answered yet."""

    code = "idempotency_key_in_progress"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"Retry-After": "1"})


class UnauthorizedError(ServiceError):
    """Missing or wrong API key."""

    status_code = 401
    code = "unauthorized"

    def __init__(self, detail: str):
        super().__init__(detail, headers={"WWW-Authenticate": "Bearer"})


class ObjectStoreError(ServiceError):
    """The object store (S3, ...) refused or failed a read or write the request needed."""

    status_code = 502
    code = "object_store_error"


class OverloadedError(ServiceError):
    """The online queue is full or no worker is live: retry after ``retry_after_s`` seconds."""

    status_code = 503
    code = "overloaded"

    def __init__(self, detail: str, *, retry_after_s: int):
        super().__init__(detail, headers={"Retry-After": str(retry_after_s)})


class ResultTimeoutError(ServiceError):
    """No worker answered within ``request_timeout_s``; the result is cached when it completes."""

    status_code = 504
    code = "timeout"


class WorkerError(ServiceError):
    """A worker reported a failure for this one request (e.g. it could not decode the image)."""

    status_code = 422
    code = "worker_error"

    def __init__(self, detail: str, *, status_code: int = 422, **extra: Any):
        super().__init__(detail, **extra)
        self.status_code = status_code


# butd.images errors: (status, code). Order matters: subclasses before the base.
_IMAGE_ERRORS: tuple[tuple[type[ImageError], int, str], ...] = (
    (TooManyPixelsError, 413, "too_many_pixels"),
    (NotAnImageError, 415, "not_an_image"),
    (TruncatedImageError, 422, "corrupt_image"),
    (ImageError, 422, "corrupt_image"),
)


# butd.store.shard_store errors (an export): (status, code).
_STORE_ERRORS: tuple[tuple[type[Exception], int, str], ...] = (
    (NothingStoredError, 404, "not_found"),
    (ExportRefusedError, 422, "invalid_request"),
)


def _body(code: str, detail: str, request: Request, extra: dict[str, Any]) -> dict[str, Any]:
    body: dict[str, Any] = {"error": code, "detail": detail}
    request_id = getattr(request.state, "request_id", None)
    if request_id is not None:
        body["request_id"] = request_id
    body.update(extra)
    return body


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    if exc.status_code >= 500:
        logger.warning("%s %s -> %d %s", request.method, request.url.path, exc.status_code, exc)
    body = _body(exc.code, exc.detail, request, exc.extra)
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _image_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, code in _IMAGE_ERRORS:
        if isinstance(exc, cls):
            return JSONResponse(_body(code, str(exc), request, {}), status_code=status)
    raise exc  # unreachable: registered for ImageError only


# Framework errors (routing, a malformed multipart body): status -> code of the one body.
_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    body = _body(code, str(exc.detail), request, {})
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # every method of the path, not only those of the first route
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


async def _store_error(request: Request, exc: Exception) -> JSONResponse:
    for cls, status, code in _STORE_ERRORS:
        if isinstance(exc, cls):
            return JSONResponse(_body(code, str(exc), request, {}), status_code=status)
    raise exc  # unreachable: registered for the store's errors only


async def _invalid_name(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(_body("invalid_name", str(exc), request, {}), status_code=422)


async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
    logger.error("redis unavailable: %s", exc)
    body = _body("redis_unavailable", f"the queue (Redis) is unavailable: {exc}", request, {})
    return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    body = _body("invalid_request", "; ".join(parts), request, {})
    return JSONResponse(body, status_code=422)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping from domain errors to HTTP responses."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(ImageError, _image_error)
    app.add_exception_handler(InvalidNameError, _invalid_name)
    for cls, _, _ in _STORE_ERRORS:
        app.add_exception_handler(cls, _store_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(redis.exceptions.ConnectionError, _redis_down)
    app.add_exception_handler(redis.exceptions.TimeoutError, _redis_down)
