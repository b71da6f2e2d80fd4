"""/v1/jobs: batch extraction of a dataset (server paths or an uploaded archive)."""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import uuid
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from service import datasets
from service.auth import require_api_key
from service.backend import Queue
from service.errors import InvalidRequestError, NotFoundError
from service.schemas import (
    ErrorBody,
    ExtractOptions,
    JobCreated,
    JobItemError,
    JobRequest,
    JobStatus,
)
from service.settings import Settings
from service.uploads import check_length, save_multipart
from store.image_ids import IdPolicy, ImageIdError
from workers.protocol import ExtractOptions as QueueOptions
from workers.protocol import JobStatus as QueueJobStatus

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])

# Export formats of store.exporters and the file suffix of each.
EXPORT_SUFFIXES = {
    "h5-dense": ".h5",
    "h5-ragged": ".h5",
    "tsv": ".tsv",
    "lxmert-tsv": ".tsv",
    "npz": ".zip",  # one .npz per image, zipped (the client unpacks it into a directory)
    "npz-mcan": ".zip",
}
_JOB_ID = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 413, 422)
}


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def _queue(request: Request) -> Queue:
    queue: Queue = request.app.state.queue
    return queue


def _job_id(idempotency_key: str | None) -> str:
    """The Idempotency-Key when it is a safe id, its hash when not, else a fresh uuid."""
    if not idempotency_key:
        return uuid.uuid4().hex
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


async def _parse_job(request: Request, job_id: str) -> tuple[JobRequest, list[Path]]:
    """The job request and the roots its paths may use (an upload gets its own root)."""
    settings = _settings(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        try:
            return JobRequest.model_validate_json(await request.body()), settings.allowed_roots
        except ValidationError as exc:
            raise InvalidRequestError(f"bad job request: {exc.errors()[0]['msg']}") from None
    check_length(request, settings.max_archive_bytes)
    dest = settings.jobs_upload_dir / job_id
    archive = dest.parent / f"{dest.name}.upload"
    fields = await save_multipart(request, "archive", archive, settings.max_archive_bytes)
    await run_in_threadpool(_unpack_upload, archive, dest, settings)
    options = {k: v for k, v in fields.items() if k in ExtractOptions.model_fields}
    try:
        job = JobRequest(
            paths=[str(dest)],
            namespace=fields.get("namespace", "default"),
            options=ExtractOptions.model_validate(options),
            image_ids=fields.get("image_ids", "path"),  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        raise InvalidRequestError(f"bad job request: {exc.errors()[0]['msg']}") from None
    return job, [dest]


def _unpack_upload(archive: Path, dest: Path, settings: Settings) -> None:
    """Unpack the saved upload into ``dest`` (replacing an earlier try with the same id)."""
    if dest.exists():
        shutil.rmtree(dest)
    limits = datasets.ArchiveLimits(
        max_members=settings.max_archive_members,
        max_unpacked_bytes=settings.max_archive_unpacked_bytes,
    )
    try:
        count = datasets.unpack(archive, dest, limits)
    finally:
        archive.unlink(missing_ok=True)
    logger.info("unpacked job archive into %s: %d files", dest, count)


@router.post(
    "",
    status_code=201,
    response_model=JobCreated,
    responses=_ERRORS,
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
                            "namespace": {"type": "string"},
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
    ``archive`` (zip / tar). The same ``Idempotency-Key`` returns the same job."""
    settings = _settings(request)
    job_id = _job_id(idempotency_key)
    job, roots = await _parse_job(request, job_id)
    try:
        policy = IdPolicy(job.image_ids, job.id_map or {}, "id_map" if job.id_map else "")
    except ImageIdError as exc:
        raise InvalidRequestError(str(exc)) from None
    found = await run_in_threadpool(
        datasets.expand, job.paths, roots, settings.image_suffixes, policy
    )
    jobs_dir = settings.store_dir / "jobs"
    await run_in_threadpool(datasets.write_manifest, jobs_dir, job_id, job.namespace, found.items)
    status = await run_in_threadpool(
        _queue(request).create_job,
        job_id,
        found.items,
        namespace=job.namespace,
        options=QueueOptions(**job.options.model_dump()),
    )
    logger.info("job %s: %d images, namespace %s", job_id, status.total, job.namespace)
    body = JobCreated(
        job_id=job_id,
        total=status.total,
        shards=-(-status.total // settings.job_shard_size),
        skipped=[JobItemError(image_id=k, reason=v) for k, v in found.skipped.items()],
    )
    return JSONResponse(
        body.model_dump(), status_code=201, headers={"Location": f"/v1/jobs/{job_id}"}
    )


@router.get("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Job progress")
async def status(request: Request, job_id: str) -> dict[str, Any]:
    """State, counts, per-item errors, images/s and ETA of a job."""
    found = await run_in_threadpool(_queue(request).job_status, _checked_job_id(job_id))
    if found is None:
        raise NotFoundError(f"no job {job_id!r}")
    return _status_body(found)


@router.delete("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="Cancel a job")
async def cancel(request: Request, job_id: str) -> dict[str, Any]:
    """Cancel a queued or running job (workers skip its remaining shards)."""
    queue = _queue(request)
    state = await run_in_threadpool(queue.cancel_job, _checked_job_id(job_id))
    found = await run_in_threadpool(queue.job_status, job_id)
    if state is None or found is None:
        raise NotFoundError(f"no job {job_id!r}")
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
    format: Annotated[str, Query(description=" | ".join(EXPORT_SUFFIXES))] = "h5-ragged",
    model_version: str | None = None,
    ids: Annotated[str, Query(pattern="^(consumer|stored)$")] = "consumer",
    allow_padding: bool = False,
) -> FileResponse:
    """The job's cached records in a store format (records not yet extracted are left out).

    ``ids=consumer`` writes ids as the format's consumer keys them (``butd export -h``); an id
    it cannot convert, or an adaptive job exported as ``h5-dense`` without ``allow_padding``,
    is refused with 422 and the reason."""
    if format not in EXPORT_SUFFIXES:
        names = sorted(EXPORT_SUFFIXES)
        raise InvalidRequestError(f"format must be one of {names}; got {format!r}")
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
    options = {"ids": ids, **({"allow_padding": allow_padding} if format == "h5-dense" else {})}
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
