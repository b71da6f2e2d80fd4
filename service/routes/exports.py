"""POST /v1/jobs/{job_id}/exports: a job's export written into object storage by the gateway."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from butd.service import datasets, url_sources
from butd.service.auth import require_api_key
from butd.service.errors import NotFoundError, ObjectStoreError
from butd.service.routes.jobs import ExportFormat, _checked_job_id, _settings
from butd.service.schemas import ErrorBody
from butd.store.objects import put_file

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_api_key)])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 403, 404, 422, 502)
}


class ExportRequest(BaseModel):
    """Where to write a job's export, and in which format."""

    url: str = Field(description="target object URL (s3://bucket/key) under BUTD_EXPORT_URLS")
    format: ExportFormat = "h5-ragged"
    model_version: str | None = None


class ExportWritten(BaseModel):
    """Where an export was written and what it holds."""

    url: str
    records: int
    bytes: int
    model_version: str


@router.post(
    "/{job_id}/exports",
    status_code=201,
    response_model=ExportWritten,
    responses=_ERRORS,
    summary="Write a job's features to object storage",
)
async def export_to_url(request: Request, job_id: str, body: ExportRequest) -> ExportWritten:
    """The export of ``GET /v1/jobs/{job_id}/export``, uploaded to ``url`` with the gateway's
    object-store credentials (``AWS_*``); ``npz`` is written as a zip of one .npz per image."""
    settings = _settings(request)
    target = url_sources.check_allowed(body.url, settings.export_urls, "BUTD_EXPORT_URLS")
    manifest = datasets.read_manifest(settings.store_dir / "jobs", _checked_job_id(job_id))
    if manifest is None:
        raise NotFoundError(f"no job {job_id!r}")
    version = body.model_version or request.app.state.online.models.current()
    if version is None:
        raise NotFoundError("no model version known yet (no worker has been seen)")
    out = settings.store_dir / "exports" / f"{job_id}-{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    namespace, image_ids = manifest
    try:
        count = await run_in_threadpool(
            request.app.state.store.export, version, namespace, image_ids, body.format, out
        )
        size = out.stat().st_size
        await run_in_threadpool(put_file, out, target)
    except OSError as exc:
        raise ObjectStoreError(f"cannot write {target!r}: {exc}") from exc
    finally:
        out.unlink(missing_ok=True)
    logger.info("job %s: exported %d records as %s to %s", job_id, count, body.format, target)
    return ExportWritten(url=target, records=count, bytes=size, model_version=version)
