"""/v1/caption and /v1/vqa: a trained head over the stored regions of one image.

The image is named by ``image_id`` (+ ``namespace``) or ``sha256`` in the query string (its
features must be stored: 404 otherwise), or uploaded as /v1/features takes it (multipart
``file``, or a raw ``image/*`` body): cached features are used, else they are extracted first
(``OnlineService.extract``). A worker serving the head then answers (``HeadsService.ask``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool

from butd.service.auth import require_api_key
from butd.service.errors import InvalidRequestError, NotFoundError, WorkerError
from butd.service.heads_online import HeadsService
from butd.service.names import ImageIdQuery, NamespaceQuery, Sha256Query, given_id, namespace_of
from butd.service.online import OnlineService, Upload
from butd.service.schemas import CaptionResponse, ErrorBody, ScoredAnswer, VQAResponse
from butd.service.uploads import read_image_body
from butd.store import ids
from butd.store.records import StoredRecord
from butd.workers.heads_protocol import HeadsResult, HeadTask
from butd.workers.options import MAX_GRID_SIZE, ExtractOptions

router = APIRouter(prefix="/v1", tags=["heads"], dependencies=[Depends(require_api_key)])

_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 404, 408, 409, 413, 415, 422, 503, 504)
}
_UPLOAD_BODY = {
    "requestBody": {
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
        "required": False,
    }
}

ImageId = ImageIdQuery
Namespace = NamespaceQuery
Sha256 = Sha256Query
GridSize = Annotated[
    int | None,
    Query(
        ge=0,
        le=MAX_GRID_SIZE,
        description="extract G x G grid features (for heads trained on grids)",
    ),
]


@dataclass(frozen=True)
class Image:
    """The stored record a head will read, and how the request named it."""

    stored: StoredRecord
    image_id: str | None
    namespace: str | None
    cached: bool
    fields: dict[str, str]


async def _image(
    request: Request,
    image_id: str | None,
    namespace: str | None,
    sha256: str | None,
    grid_size: int | None = None,
) -> Image:
    """The record named by ``sha256`` or ``image_id``, or that of the uploaded bytes.

    ``grid_size`` G (for heads trained on grid features) extracts or reads the record of the
    grid extraction (``POST /v1/features?grid_size=G``)."""
    online: OnlineService = request.app.state.online
    options = ExtractOptions(grid_size=grid_size or None)
    if sha256 is not None or image_id is not None:
        return await run_in_threadpool(_stored, online, image_id, namespace, sha256, grid_size)
    if not request.headers.get("content-type") and request.headers.get("content-length") in (
        None,
        "0",
    ):
        raise InvalidRequestError("name the image by image_id or sha256, or upload it")
    body = await read_image_body(request, online.settings.max_body_bytes)
    sha = hashlib.sha256(body.data).hexdigest()
    given = given_id(body.fields.get("image_id"), None)
    ns = namespace_of(body.fields.get("namespace") or namespace)
    upload = Upload(body.data, sha, given or sha, ns if given else "", options)
    extracted = await run_in_threadpool(online.extract, upload, request.state.request_id)
    return Image(extracted.stored, given, ns if given else None, extracted.cached, body.fields)


def _stored(
    online: OnlineService,
    image_id: str | None,
    namespace: str | None,
    sha256: str | None,
    grid_size: int | None = None,
) -> Image:
    ns = namespace_of(namespace) if image_id is not None else None
    if image_id is not None:
        ids.check_image_id(image_id)
    if sha256 is not None:
        sha256 = sha256.lower()
    else:
        assert image_id is not None and ns is not None
        sha256 = online.store.resolve(ns, image_id)
        if sha256 is None:
            raise NotFoundError(f"no image {image_id!r} in namespace {ns!r}")
    version = online.models.current()
    if version is None:
        raise NotFoundError("no model version known yet (no worker has been seen)")
    if grid_size:  # the gateway cannot name the grid extraction's version of a stored id
        raise InvalidRequestError(
            "grid_size applies to an uploaded image (its grid extraction is cached like any "
            "other); upload the image instead of naming it by image_id or sha256"
        )
    stored = online.store.get(version, sha256)
    if stored is None:
        raise NotFoundError(
            f"no stored features of sha256 {sha256} under model {version}; "
            "POST the image to /v1/features first, or upload it here"
        )
    return Image(stored, image_id, ns, True, {})


async def _ask(request: Request, task: HeadTask, image: Image, **params: Any) -> HeadsResult:
    heads: HeadsService = request.app.state.heads
    record = image.stored.record
    return await run_in_threadpool(
        heads.ask,
        task,
        record.model_version,
        image.stored.sha256,
        request.state.request_id,
        **params,
    )


def _common(request: Request, image: Image, result: HeadsResult) -> dict[str, Any]:
    return {
        "head": result.head,
        "note": result.note,
        "model_version": result.model_version,
        "sha256": image.stored.sha256,
        "image_id": image.image_id,
        "namespace": image.namespace,
        "request_id": request.state.request_id,
        "cached": image.cached,
        "image_w": result.image_w,
        "image_h": result.image_h,
        "num_boxes": len(result.boxes),
        "boxes": result.boxes,
    }


@router.post(
    "/caption",
    summary="Caption one image from its region features",
    response_model=CaptionResponse,
    responses=_RESPONSES,
    openapi_extra=_UPLOAD_BODY,
)
async def caption(
    request: Request,
    image_id: ImageId = None,
    namespace: Namespace = None,
    sha256: Sha256 = None,
    beam_size: Annotated[int, Query(ge=1, le=20, description="beam size (Up-Down: 5)")] = 5,
    max_len: Annotated[int, Query(ge=1, le=50, description="longest caption, words")] = 20,
    grid_size: GridSize = None,
) -> CaptionResponse:
    """The caption a worker's caption head writes, with its attention per word over the
    image's regions (each row sums to 1 over the ``num_boxes`` boxes)."""
    image = await _image(request, image_id, namespace, sha256, grid_size)
    result = await _ask(request, "caption", image, beam_size=beam_size, max_len=max_len)
    return CaptionResponse(
        **_common(request, image, result),
        caption=" ".join(result.words),
        words=result.words,
        log_prob=result.log_prob,
        attention=result.attention,
    )


@router.post(
    "/vqa",
    summary="Answer a question about one image from its region features",
    response_model=VQAResponse,
    responses=_RESPONSES,
    openapi_extra=_UPLOAD_BODY,
)
async def vqa(
    request: Request,
    question: Annotated[str | None, Query(max_length=500, description="the question")] = None,
    image_id: ImageId = None,
    namespace: Namespace = None,
    sha256: Sha256 = None,
    top: Annotated[int, Query(ge=1, le=100, description="how many answers")] = 5,
    grid_size: GridSize = None,
) -> VQAResponse:
    """The answers of a worker's VQA head (sigmoid scores, best first), with its attention
    per glimpse over the image's regions. ``question`` may also be a form field."""
    multipart = request.headers.get("content-type", "").startswith("multipart/")
    if not (question or "").strip() and not multipart:
        raise InvalidRequestError("a question is required (query or form field 'question')")
    image = await _image(request, image_id, namespace, sha256, grid_size)
    asked = (question or image.fields.get("question") or "").strip()
    if not asked:
        raise InvalidRequestError("a question is required (query or form field 'question')")
    if len(asked) > 500:
        raise InvalidRequestError(f"the question is too long: {len(asked)} characters, max 500")
    result = await _ask(request, "vqa", image, question=asked, top=top)
    if not result.answers:
        raise WorkerError("the VQA head returned no answers")
    best, score = result.answers[0]
    return VQAResponse(
        **_common(request, image, result),
        question=asked,
        answer=best,
        score=score,
        answers=[ScoredAnswer(answer=a, score=s) for a, s in result.answers],
        attention=result.attention,
    )
