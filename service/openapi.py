"""The gateway's OpenAPI document, made complete: every ``$ref`` resolves, every 422 is the one
error body.

FastAPI documents only the models its routes declare. ``POST /v1/jobs`` reads its body itself
(JSON or a multipart archive), so its ``JobRequest`` schema is added here; and FastAPI's own 422
schema (``HTTPValidationError``) is replaced by ``ErrorBody``, which is what
``butd.service.errors`` answers for every validation error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from butd.service.schemas import ErrorBody, JobRequest

_REF = "#/components/schemas/{model}"
_FASTAPI_422 = ("HTTPValidationError", "ValidationError")


def _add_models(schemas: dict[str, Any], models: Sequence[type[BaseModel]]) -> None:
    for model in models:
        schema = model.model_json_schema(ref_template=_REF)
        for name, definition in schema.pop("$defs", {}).items():
            schemas.setdefault(name, definition)
        schemas.setdefault(model.__name__, schema)


def _one_error_body(document: dict[str, Any]) -> None:
    """Point every 422 at ``ErrorBody`` and drop FastAPI's validation-error schemas."""
    error_ref = {"$ref": _REF.format(model=ErrorBody.__name__)}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response is None:
                continue
            response["content"] = {"application/json": {"schema": error_ref}}
    for name in _FASTAPI_422:
        document["components"]["schemas"].pop(name, None)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document of ``app`` (cached on it), complete and with one error body."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    document = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
    )
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    _add_models(schemas, [JobRequest, ErrorBody])
    _one_error_body(document)
    app.openapi_schema = document
    return document


def install_openapi(app: FastAPI) -> None:
    """Serve ``build_openapi`` at /openapi.json (and /docs)."""
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
