"""/v1/jobs: batch extraction of a dataset (server paths or an uploaded archive)."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from butd.service import datasets, url_sources
from butd.service.auth import require_api_key
from butd.service.backend import Queue, RequestClaim
from butd.service.errors import (
    IdempotencyKeyInProgressError,
    IdempotencyKeyReusedError,
    InvalidRequestError,
    NotFoundError,
    UnsupportedMediaError,
)
from butd.service.job_uploads import UploadArea, UploadsFullError
from butd.service.schemas import (
    ErrorBody,
    JobCreated,
    JobItemError,
    JobRequest,
    JobStatus,
)
from butd.service.settings import Settings
from butd.service.uploads import check_length, read_raw, save_multipart
from butd.store import ids
from butd.store.image_ids import IdPolicy, ImageIdError
from butd.workers.options import MAX_BOXES, MAX_GRID_SIZE, ExtractOptions
from butd.workers.protocol import TERMINAL_STATES
from butd.workers.protocol import JobStatus as QueueJobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

# Export formats of butd.store.exporters and the file suffix of each.
EXPORT_SUFFIXES = {
    "h5-dense": ".h5",
    "h5-ragged": ".h5",
    "tsv": ".tsv",
    "lxmert-tsv": ".tsv",
    "h5-grid": ".h5",  # <image_id>_grids (G*G, D): jobs submitted with grid_size
    "npz": ".zip",  # one .npz per image, zipped (the client unpacks it into a directory)
    "npz-mcan": ".zip",
}
_JOB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
ExportFormat = Literal["h5-dense", "h5-ragged", "tsv", "lxmert-tsv", "npz", "npz-mcan", "h5-grid"]
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (401, 404, 422)}
_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 408, 409, 413, 415, 422, 502, 503, 507)
}


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _job_id(idempotency_key: str | None) -> str:
    """The Idempotency-Key when it is a safe file name, its hash when not, else a fresh uuid.

    Raises:
        InvalidNameError: a key that breaks ``butd.store.ids.JOB_ID_RULE`` (422).
    """
    if idempotency_key is None:
        return uuid.uuid4().hex
    ids.check_job_id(idempotency_key)
    if _JOB_ID.match(idempotency_key):
        return idempotency_key
    return hashlib.sha256(idempotency_key.encode()).hexdigest()[:32]


def _checked_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise NotFoundError(f"no job {job_id!r}")
    return job_id


def _status_body(status: QueueJobStatus) -> dict[str, Any]:
    return JobStatus(
        job_id=status.job_id,
        state=status.state,
        total=status.total,
        done=status.done,
        failed=status.failed,
        errors=[JobItemError(image_id=k, reason=v) for k, v in status.errors.items()],
        images_per_s=round(status.images_per_s, 3),
        eta_s=None if status.eta_s is None else round(status.eta_s, 1),
        namespace=status.namespace or None,
    ).model_dump()


def _job_of(raw: dict[str, Any]) -> JobRequest:
    try:
        return JobRequest.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequestError(f"bad job request: {_errors(exc)}") from None


def _errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())


def _fields_job(fields: dict[str, str], dest: str) -> JobRequest:
    """The job of a multipart upload: its namespace and options fields, the upload's root."""
    options = {k: v for k, v in fields.items() if k in ExtractOptions.model_fields}
    rule = fields.get("image_ids") or "path"
    return _job_of({"paths": [dest], "namespace": fields.get("namespace") or "default",
                    "options": options, "image_ids": rule})  # fmt: skip


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


async def _once(
    request: Request,
    job_id: str,
    fingerprint: str,
    create: Callable[[], Awaitable[dict[str, Any]]],
) -> JSONResponse:
    """Run ``create`` once per job id: a repeat of the same request gets the first answer, a
    different request under the same Idempotency-Key a 409 naming the key."""
    if request.headers.get("idempotency-key") is None:  # a fresh uuid: nothing to guard
        return _created(await create(), replayed=False)
    queue = _queue(request)
    claim = await run_in_threadpool(queue.claim_request, job_id, fingerprint)
    if claim is not None:
        return _replay(request, job_id, claim, fingerprint)
    try:
        body = await create()
    except BaseException:
        await run_in_threadpool(queue.release_request, job_id)
        raise
    await run_in_threadpool(queue.save_answer, job_id, json.dumps(body))
    return _created(body, replayed=False)


def _replay(request: Request, job_id: str, claim: RequestClaim, fingerprint: str) -> JSONResponse:
    key = request.headers.get("idempotency-key", job_id)
    if claim.fingerprint != fingerprint:
        raise IdempotencyKeyReusedError(
            f"Idempotency-Key {key!r} was already used with a different request (other paths, "
            "archive, namespace or options); use a new key for a new job"
        )
    if claim.answer is None:
        raise IdempotencyKeyInProgressError(
            f"a request with Idempotency-Key {key!r} is still being processed; retry shortly"
        )
    return _created(json.loads(claim.answer), replayed=True)


def _created(body: dict[str, Any], *, replayed: bool) -> JSONResponse:
    headers = {"Location": f"/v1/jobs/{body['job_id']}"}
    if replayed:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(body, status_code=201, headers=headers)


async def _create(
    request: Request, job_id: str, job: JobRequest, roots: list[Path]
) -> dict[str, Any]:
    """Expand the job's paths under ``roots``, keep its manifest, queue it; the 201 body."""
    settings = _settings(request)
    try:
        policy = IdPolicy(job.image_ids, job.id_map or {}, "id_map" if job.id_map else "")
    except ImageIdError as exc:
        raise InvalidRequestError(str(exc)) from None
    found = await run_in_threadpool(
        url_sources.expand_any,
        job.paths,
        roots,
        settings.allowed_urls,
        settings.image_suffixes,
        policy,
    )
    jobs_dir = settings.store_dir / "jobs"
    await run_in_threadpool(datasets.write_manifest, jobs_dir, job_id, job.namespace, found.items)
    status = await run_in_threadpool(
        _queue(request).create_job,
        job_id,
        found.items,
        namespace=job.namespace,
        options=job.options,
    )
    logger.info("job %s: %d images, namespace %s", job_id, status.total, job.namespace)
    return JobCreated(
        job_id=job_id,
        total=status.total,
        shards=-(-status.total // settings.job_shard_size),
        skipped=[JobItemError(image_id=k, reason=v) for k, v in found.skipped.items()],
    ).model_dump()


async def _submit_paths(request: Request, job_id: str) -> JSONResponse:
    settings = _settings(request)
    raw = await read_raw(request, settings.max_job_body_bytes)
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequestError(f"bad job request: the body is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise InvalidRequestError("bad job request: the body must be a JSON object")
    job = _job_of(parsed)
    fingerprint = _fingerprint("paths", job.model_dump_json())
    roots = settings.allowed_roots
    return await _once(request, job_id, fingerprint, lambda: _create(request, job_id, job, roots))


async def _submit_archive(request: Request, job_id: str) -> JSONResponse:
    """Receive the archive within the uploads' disk budget, then unpack it into a directory of
    its own (only when the key is new); the archive is deleted whatever happens."""
    settings = _settings(request)
    area = _uploads(request)
    check_length(request, settings.max_archive_bytes)
    declared = request.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else settings.max_archive_bytes
    room = await run_in_threadpool(area.acquire, size, _state_fn(request))
    archive = area.incoming()
    try:
        saved = await save_multipart(request, "archive", archive, settings.max_archive_bytes)
        job = _fields_job(saved.fields, "upload")
        fingerprint = _fingerprint("archive", saved.sha256, job.model_dump_json())

        async def create() -> dict[str, Any]:
            dest = area.job_dir(job_id)
            unpack_cap = min(settings.max_archive_unpacked_bytes, max(room - saved.size, 0))
            try:
                await run_in_threadpool(_unpack_upload, archive, dest, settings, unpack_cap)
                job_here = job.model_copy(update={"paths": [str(dest)]})
                return await _create(request, job_id, job_here, [dest])
            except BaseException:
                await run_in_threadpool(shutil.rmtree, dest, True)
                raise

        return await _once(request, job_id, fingerprint, create)
    finally:
        archive.unlink(missing_ok=True)
        area.release(size)


def _unpack_upload(archive: Path, dest: Path, settings: Settings, max_bytes: int) -> None:
    """Unpack the saved upload into the new directory ``dest``, at most ``max_bytes``."""
    limits = datasets.ArchiveLimits(
        max_members=settings.max_archive_members, max_unpacked_bytes=max_bytes
    )
    try:
        count = datasets.unpack(archive, dest, limits)
    except datasets.UnpackTooLargeError:
        if max_bytes >= settings.max_archive_unpacked_bytes:
            raise  # the archive cap itself: the archive is at fault (422)
        raise UploadsFullError(  # the disk budget left: retry once running jobs have ended
            f"the archive unpacks to over {max_bytes} bytes, what is left of the disk budget "
            f"of pending uploads ({settings.max_pending_upload_bytes} bytes, "
            "BUTD_MAX_PENDING_UPLOAD_BYTES); retry when running jobs have finished",
            retry_after_s=max(settings.retry_after_s, 30),
        ) from None
    logger.info("unpacked job archive into %s: %d files", dest, count)


def _uploads(request: Request) -> UploadArea:
    area: UploadArea = request.app.state.uploads
    return area


def _state_fn(request: Request) -> Callable[[str], str | None]:
    queue = _queue(request)

    def state(job_id: str) -> str | None:
        found = queue.job_status(job_id)
        return None if found is None else found.state

    return state


@router.post(
    "",
    status_code=201,
    response_model=JobCreated,
    responses=_SUBMIT_ERRORS,
    summary="Submit a batch job",
    openapi_extra={
        "requestBody": {
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "archive": {"type": "string", "format": "binary"},
                            "namespace": {
                                "type": "string",
                                "pattern": ids.NAMESPACE_PATTERN,
                                "description": ids.NAMESPACE_RULE,
                            },
                            "min_boxes": {"type": "integer", "minimum": 1, "maximum": MAX_BOXES},
                            "max_boxes": {"type": "integer", "minimum": 1, "maximum": MAX_BOXES},
                            "conf_thresh": {"type": "number", "minimum": 0, "maximum": 1},
                            "grid_size": {
                                "type": "integer",
                                "minimum": 0,
                                "maximum": MAX_GRID_SIZE,
                            },
                            "image_ids": {"type": "string", "enum": ["path", "stem", "coco"]},
                        },
                        "required": ["archive"],
                    }
                },
            },
            "required": True,
        }
    },
)
async def submit(
    request: Request, idempotency_key: Annotated[str | None, Header()] = None
) -> JSONResponse:
    """Queue a dataset: JSON ``{"paths": [...]}`` under the allowed roots, or a multipart
    ``archive`` (zip / tar). The same ``Idempotency-Key`` with the same request answers the
    first job again; with a different request, 409 ``idempotency_key_reused``."""
    job_id = _job_id(idempotency_key)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await _submit_archive(request, job_id)
    if ctype not in ("application/json", ""):
        raise UnsupportedMediaError(
            f"Content-Type {ctype!r} is not a job request; send application/json "
            "({\"paths\": [...]}) or multipart/form-data with an 'archive' part"
        )
    return await _submit_paths(request, job_id)


@router.get("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Job progress")
async def status(request: Request, job_id: str) -> dict[str, Any]:
    """State, counts, per-item errors, images/s and ETA of a job."""
    found = await run_in_threadpool(_queue(request).job_status, _checked_job_id(job_id))
    if found is None:
        raise NotFoundError(f"no job {job_id!r}")
    if found.state in TERMINAL_STATES:
        await run_in_threadpool(_uploads(request).discard, job_id)
    return _status_body(found)


@router.delete("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Cancel a job")
async def cancel(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (workers skip its remaining shards)."""
    queue = _queue(request)
    state = await run_in_threadpool(queue.cancel_job, _checked_job_id(job_id))
    found = await run_in_threadpool(queue.job_status, job_id)
    if state is None or found is None:
        raise NotFoundError(f"no job {job_id!r}")
    await run_in_threadpool(_uploads(request).discard, job_id)
    return _status_body(found)


@router.get(
    "/{job_id}/export",
    response_class=FileResponse,
    responses={**_ERRORS, 200: {"content": {"application/octet-stream": {}}}},
    summary="Download a job's features",
)
async def export(
    request: Request,
    job_id: str,
    format: Annotated[ExportFormat, Query(description="store format of the file")] = "h5-ragged",
    model_version: str | None = None,
    id_keys: Annotated[str, Query(alias="ids", pattern="^(consumer|stored)$")] = "consumer",
    allow_padding: bool = False,
) -> FileResponse:
    """The job's cached records in a store format (records not yet extracted are left out).

    ``ids=consumer`` writes ids as the format's consumer keys them (``butd export -h``); an id
    it cannot convert, or an adaptive job exported as ``h5-dense`` without ``allow_padding``,
    is refused with 422 and the reason."""
    settings = _settings(request)
    manifest = datasets.read_manifest(settings.store_dir / "jobs", _checked_job_id(job_id))
    if manifest is None:
        raise NotFoundError(f"no job {job_id!r}")
    version = model_version or request.app.state.online.models.current()
    if version is None:
        raise NotFoundError("no model version known yet (no worker has been seen)")
    suffix = EXPORT_SUFFIXES[format]
    out = settings.store_dir / "exports" / f"{job_id}-{uuid.uuid4().hex[:8]}{suffix}"
    out.parent.mkdir(parents=True, exist_ok=True)
    namespace, image_ids = manifest
    options = {"ids": id_keys, **({"allow_padding": allow_padding} if format == "h5-dense" else {})}
    count = await run_in_threadpool(
        request.app.state.store.export, version, namespace, image_ids, format, out, options
    )
    logger.info("job %s: exported %d records as %s", job_id, count, format)
    return FileResponse(
        out,
        filename=f"{job_id}{out.suffix}",
        headers={"X-Records": str(count), "X-Model-Version": version},
        background=BackgroundTask(out.unlink, missing_ok=True),
    )
