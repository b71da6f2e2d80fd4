"""/v1/features: extract one image now, or read cached regions by image id or content hash."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from butd.service import encoding
from butd.service.auth import require_api_key
from butd.service.errors import InvalidRequestError, NotFoundError
from butd.service.names import (
    ImageIdPath,
    ImageIdQuery,
    NamespaceQuery,
    Sha256Path,
    given_id,
    namespace_of,
)
from butd.service.online import OnlineService, Upload
from butd.service.schemas import ErrorBody, FeatureDtype, FeaturesResponse
from butd.service.uploads import read_image_body
from butd.store import ids
from butd.store.image_ids import IdPolicy, ImageIdError
from butd.store.records import StoredRecord
from butd.workers.options import MAX_BOXES, MAX_GRID_SIZE, ExtractOptions

router = APIRouter(
    prefix="/v1/features", tags=["features"], dependencies=[Depends(require_api_key)]
)

_OPTION_NAMES = tuple(ExtractOptions.model_fields)

_BINARY_CONTENT = {
    encoding.NPZ: {"schema": {"type": "string", "format": "binary"}},
    encoding.SAFETENSORS: {"schema": {"type": "string", "format": "binary"}},
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": FeaturesResponse, "content": _BINARY_CONTENT},
    404: {"model": ErrorBody},
}
_UPLOAD_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_RESPONSES,
    **{code: {"model": ErrorBody} for code in (400, 401, 408, 409, 413, 415, 422, 503, 504)},
}

Dtype = Annotated[
    FeatureDtype | None, Query(description="feature dtype of the response (default float16)")
]


def _service(request: Request) -> OnlineService:
    service: OnlineService = request.app.state.online
    return service


def _options(query: Request, fields: dict[str, str]) -> ExtractOptions:
    """Options from form fields or the query string, validated here once (422 on a bad value):
    the value goes to the worker as it is."""
    raw = {k: fields.get(k, query.query_params.get(k)) for k in _OPTION_NAMES}
    try:
        options = ExtractOptions.model_validate({k: v for k, v in raw.items() if v is not None})
    except ValidationError as exc:
        # A whole-model check has an empty ``loc``: its message then stands alone.
        detail = "; ".join(
            ": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors()
        )
        raise InvalidRequestError(f"bad extraction options: {detail}") from None
    return options


def render(
    request: Request, stored: StoredRecord, dtype: str | None, extra: dict[str, Any]
) -> Response:
    """The record in the format the ``Accept`` header asks for (JSON, npz or safetensors)."""
    dtype = dtype or request.app.state.settings.json_feature_dtype
    if not stored.description:
        described = _service(request).models.describe(stored.record.model_version)
        stored = dataclasses.replace(stored, description=described)
    media = encoding.negotiate(request.headers.get("accept"))
    headers = {"X-Model-Version": stored.record.model_version}
    if media == encoding.NPZ:
        data = encoding.to_npz(stored, dtype, extra)
        return Response(data, media_type=media, headers=headers)
    if media == encoding.SAFETENSORS:
        data = encoding.to_safetensors(stored, dtype, extra)
        return Response(data, media_type=media, headers=headers)
    return JSONResponse(encoding.to_json(stored, dtype, extra), headers=headers)


@router.post(
    "",
    summary="Extract the regions of one image",
    response_model=None,
    responses=_UPLOAD_RESPONSES,
    openapi_extra={
        "requestBody": {
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
                "image/*": {"schema": {"type": "string", "format": "binary"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            },
            "required": True,
        }
    },
)
async def extract(
    request: Request,
    dtype: Dtype = None,
    image_id: ImageIdQuery = None,
    namespace: NamespaceQuery = None,
    # Declared for the OpenAPI document (and checked by FastAPI); ``_options`` reads them.
    min_boxes: Annotated[int | None, Query(ge=1, le=MAX_BOXES)] = None,
    max_boxes: Annotated[int | None, Query(ge=1, le=MAX_BOXES)] = None,
    conf_thresh: Annotated[float | None, Query(ge=0.0, le=1.0)] = None,
    grid_size: Annotated[int | None, Query(ge=0, le=MAX_GRID_SIZE)] = None,
    id_rule: Annotated[str | None, Query(pattern="^(path|stem|coco)$")] = None,
) -> Response:
    """Upload an image (multipart ``file``, or a raw ``image/*`` body) and get its regions.

    Cached bytes (same sha256, same model version) are answered without a worker. ``image_id``
    and ``namespace`` may also be form fields; without ``image_id``, ``id_rule`` (path | stem |
    coco, as ``butd extract --image-ids``) names the image from the multipart file name; any
    of ``min_boxes``, ``max_boxes``, ``conf_thresh``, ``grid_size`` makes a different model
    version and always reaches a worker. ``grid_size`` G adds a (G, G, D) ``grid`` of res5
    features from the same detector pass; the regions are the same bytes as without it. GET it
    back with that ``model_version``.
    """
    service = _service(request)
    body = await read_image_body(request, service.settings.max_body_bytes)
    sha = hashlib.sha256(body.data).hexdigest()
    chosen = given_id(body.fields.get("image_id"), image_id) or _named_by_rule(body, id_rule)
    ns = namespace_of(body.fields.get("namespace") or namespace)
    upload = Upload(
        data=body.data,
        sha256=sha,
        image_id=chosen or sha,
        namespace=ns if chosen else "",
        options=_options(request, body.fields),
    )
    result = await run_in_threadpool(service.extract, upload, request.state.request_id)
    extra = {
        "request_id": result.request_id,
        "image_id": upload.image_id,
        "namespace": upload.namespace or None,
        "cached": result.cached,
    }
    response = render(request, result.stored, dtype, extra)
    response.headers["X-Cache"] = "hit" if result.cached else "miss"
    return response


def _named_by_rule(body: Any, rule: str | None) -> str | None:
    """The id ``rule`` gives the uploaded file's name (None without a rule); 422 when the
    rule refuses the name or the upload has none."""
    rule = body.fields.get("id_rule") or rule
    if rule is None:
        return None
    if not body.filename:
        raise InvalidRequestError(f"id_rule {rule!r} needs a multipart file with a file name")
    try:
        named = IdPolicy(rule).image_id(body.filename)
    except ImageIdError as exc:
        raise InvalidRequestError(str(exc)) from None
    problem = ids.image_id_problem(named)
    if problem is not None:
        raise InvalidRequestError(problem)
    return named


@router.get(
    "/sha256/{sha256}",
    summary="Cached regions by content hash",
    response_model=None,
    responses=_RESPONSES,
)
async def get_by_sha256(
    request: Request,
    sha256: Sha256Path,
    dtype: Dtype = None,
    model_version: str | None = None,
) -> Response:
    """The cached record of the image whose bytes hash to ``sha256`` (404 when not cached)."""
    sha256 = sha256.lower()
    stored = await run_in_threadpool(_cached, request, sha256, model_version)
    extra = {"request_id": request.state.request_id, "cached": True}
    return render(request, stored, dtype, extra)


@router.get(
    "/{image_id:path}",
    summary="Cached regions by image id",
    response_model=None,
    responses=_RESPONSES,
)
async def get_by_id(
    request: Request,
    image_id: ImageIdPath,
    namespace: NamespaceQuery = None,
    dtype: Dtype = None,
    model_version: str | None = None,
) -> Response:
    """The cached record of ``(namespace, image_id)`` (404 when the id or record is unknown)."""
    ids.check_image_id(image_id)
    ns = namespace_of(namespace)
    store = _service(request).store
    sha = await run_in_threadpool(store.resolve, ns, image_id)
    if sha is None:
        raise NotFoundError(f"no image {image_id!r} in namespace {ns!r}")
    stored = await run_in_threadpool(_cached, request, sha, model_version)
    extra = {
        "request_id": request.state.request_id,
        "image_id": image_id,
        "namespace": ns,
        "cached": True,
    }
    return render(request, stored, dtype, extra)


def _cached(request: Request, sha256: str, model_version: str | None) -> StoredRecord:
    service = _service(request)
    version = model_version or service.models.current()
    if version is None:
        raise NotFoundError("no model version known yet (no worker has been seen)")
    stored = service.store.get(version, sha256)
    if stored is None:
        raise NotFoundError(f"no cached record of sha256 {sha256} under model {version}")
    return stored
