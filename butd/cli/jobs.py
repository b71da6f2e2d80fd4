"""``butd jobs ...`` and ``butd get``: the gateway's job and cache API from the shell.

The gateway is found at ``BUTD_URL`` (default http://127.0.0.1:8000), with ``BUTD_API_KEY``
when it requires one (``butd.service.settings.ClientSettings``).

    butd jobs submit /data/coco/val2014 --namespace coco --wait
    butd jobs submit ./photos --upload --wait          # pack and upload (server can't see it)
    butd jobs status JOB_ID
    butd jobs cancel JOB_ID
    butd jobs export JOB_ID --format lxmert-tsv --out val2014.tsv
    butd get COCO_val2014_000000000042.jpg --namespace coco --out x.npz
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import logging
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from butd.cli import summaries

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("h5-dense", "h5-ragged", "tsv", "lxmert-tsv", "npz", "npz-mcan", "h5-grid")


def register(subparsers: Any) -> None:
    """Add ``butd jobs`` (submit, status, cancel, export) and ``butd get``."""
    jobs = subparsers.add_parser("jobs", help="batch jobs on a running gateway")
    sub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION", required=True)

    submit = sub.add_parser("submit", help="queue files / directories as a batch job")
    submit.add_argument("paths", nargs="+", metavar="PATH")
    submit.add_argument("--namespace", default="default", help="namespace of the image ids")
    submit.add_argument(
        "--upload", action="store_true", help="pack the paths into a tar and upload them"
    )
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument("--id", dest="job_id", default=None, help="idempotency key / job id")
    submit.add_argument("--min-boxes", type=int, default=None)
    submit.add_argument("--max-boxes", type=int, default=None)
    submit.add_argument("--conf-thresh", type=float, default=None)
    submit.add_argument(
        "--grid-size", type=int, default=None, metavar="G", help="also store G x G grid features"
    )
    submit.add_argument("--json", action="store_true", help="print the gateway's JSON answers")
    submit.set_defaults(handler=run_submit)

    status = sub.add_parser("status", help="progress of a job")
    status.add_argument("job_id", metavar="JOB_ID")
    status.add_argument("--wait", action="store_true", help="show progress until the job ends")
    status.add_argument("--json", action="store_true", help="the whole status as JSON")
    status.set_defaults(handler=run_status)

    cancel = sub.add_parser("cancel", help="cancel a job")
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument("--json", action="store_true", help="the status as JSON")
    cancel.set_defaults(handler=run_cancel)

    export = sub.add_parser("export", help="download a job's features")
    export.add_argument("job_id", metavar="JOB_ID")
    export.add_argument("--format", choices=EXPORT_FORMATS, default="h5-ragged")
    export.add_argument(
        "--out",
        required=True,
        help="file (npz: a directory), or an object URL (s3://bucket/key) the gateway writes",
    )
    export.add_argument("--model-version", default=None)
    export.add_argument(
        "--ids",
        choices=("consumer", "stored"),
        default="consumer",
        help="consumer: ids as the format's consumer keys them (default); stored: unchanged",
    )
    export.add_argument(
        "--allow-padding",
        action="store_true",
        help="h5-dense of an adaptive extraction: pad with zero rows (bottom-up-attention-vqa "
        "reads them as regions; extract with --min-boxes 36 --max-boxes 36 instead)",
    )
    export.set_defaults(handler=run_export)

    get = subparsers.add_parser("get", help="cached features of one image from a gateway")
    get.add_argument("image_id", metavar="IMAGE_ID", help="image id (or sha256 with --sha256)")
    get.add_argument("--namespace", default=None)
    get.add_argument("--sha256", action="store_true", help="IMAGE_ID is a content hash")
    get.add_argument("--out", type=Path, default=None, help="write .npz here (else a summary)")
    get.add_argument("--json", action="store_true", help="every field as JSON (long)")
    get.add_argument(
        "--model-version", default=None, help="read this version (e.g. a --grid-size extraction)"
    )
    get.set_defaults(handler=run_get)


def _client() -> Any:
    from butd.client import Client
    from butd.service.settings import ClientSettings

    settings = ClientSettings()
    return Client(settings.url, settings.api_key, timeout=settings.timeout_s)


def _print(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _show(data: dict[str, Any], as_json: bool, summary: Callable[[dict[str, Any]], str]) -> None:
    """The gateway's answer as JSON (``--json``) or as a few lines for people."""
    if as_json:
        _print(data)
    else:
        sys.stdout.write(summary(data) + "\n")


def _tar_paths(paths: list[str]) -> bytes:
    """A gzip tar of files / directories; members named relative to each given path."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for raw in paths:
            path = Path(raw)
            if path.is_dir():
                for file in sorted(p for p in path.rglob("*") if p.is_file()):
                    tf.add(file, arcname=file.relative_to(path).as_posix())
            else:
                tf.add(path, arcname=path.name)
    return buf.getvalue()


def _guarded(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report gateway errors and unreachable gateways as one log line and exit code 1."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        import httpx

        from butd.client import ButdError

        try:
            return handler(args)
        except ButdError as exc:
            logger.error("%s", exc)
        except httpx.TransportError as exc:
            logger.error("cannot reach the gateway: %s (set BUTD_URL)", exc)
        return 1

    return run


def _options(args: argparse.Namespace) -> dict[str, Any]:
    pairs = (
        ("min_boxes", args.min_boxes),
        ("max_boxes", args.max_boxes),
        ("conf_thresh", args.conf_thresh),
        ("grid_size", getattr(args, "grid_size", None)),
    )
    return {k: v for k, v in pairs if v is not None}


def _submit_paths(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Submit server paths; upload them instead when the gateway reads no server paths.

    A gateway with ``BUTD_ALLOWED_ROOTS`` empty (the default, e.g. ``make serve``) refuses every
    path; the files named here are then packed and uploaded, and the command says so. A gateway
    that reads some roots but not these refuses the job: its message names both ways out.
    """
    from butd.client import ButdError

    local = [Path(p) for p in args.paths]
    paths = [str(p.resolve()) if p.exists() else str(p) for p in local]
    try:
        return dict(
            client.submit_job(paths, args.namespace, idempotency_key=args.job_id, **_options(args))
        )
    except ButdError as exc:
        disabled = exc.error == "path_not_allowed" and exc.body.get("server_paths") == "disabled"
        if not (disabled and all(p.exists() for p in local)):
            raise
    logger.warning(
        "the gateway reads no server paths (its BUTD_ALLOWED_ROOTS is empty): uploading %s "
        "instead, as --upload does",
        ", ".join(args.paths),
    )
    return _submit_upload(client, args)


def _submit_upload(client: Any, args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        client.submit_archive(
            _tar_paths(args.paths), args.namespace, idempotency_key=args.job_id, **_options(args)
        )
    )


@_guarded
def run_submit(args: argparse.Namespace) -> int:
    """Submit a job; with --wait, follow it and exit 1 unless it ends ``done``."""
    with _client() as client:
        created = _submit_upload(client, args) if args.upload else _submit_paths(client, args)
        _show(created, args.json, summaries.created_summary)
        if not args.wait:
            return 0
        final = client.wait_job(created["job_id"])
    _show(final, args.json, summaries.status_summary)
    return 0 if final["state"] == "done" else 1


@_guarded
def run_status(args: argparse.Namespace) -> int:
    """Print a job's status (or follow it with --wait)."""
    with _client() as client:
        status = client.wait_job(args.job_id) if args.wait else client.job(args.job_id)
    _show(status, args.json, summaries.status_summary)
    return 0


@_guarded
def run_cancel(args: argparse.Namespace) -> int:
    """Cancel a job and print its status."""
    with _client() as client:
        _show(client.cancel(args.job_id), args.json, summaries.status_summary)
    return 0


@_guarded
def run_export(args: argparse.Namespace) -> int:
    """Download a job's features in a store format."""
    from butd.store.objects import is_url

    with _client() as client:
        if is_url(args.out):
            written = client.export_to_url(
                args.job_id, args.format, args.out, model_version=args.model_version
            )
            w = written
            logger.info("wrote %s (%d records, %d bytes)", w["url"], w["records"], w["bytes"])
            return 0
        out = client.export(
            args.job_id,
            args.format,
            Path(args.out),
            model_version=args.model_version,
            ids=args.ids,
            allow_padding=args.allow_padding,
        )
    logger.info("wrote %s", out)
    return 0


@_guarded
def run_get(args: argparse.Namespace) -> int:
    """Fetch one cached record: .npz with --out, else a short summary (--json: every field)."""
    with _client() as client:
        if args.out is not None:
            data = client.get_npz(
                args.image_id, args.namespace, sha256=args.sha256, model_version=args.model_version
            )
            args.out.write_bytes(data)
            logger.info("wrote %s (%d bytes)", args.out, len(data))
            return 0
        regions = (
            client.get_by_sha256(args.image_id)
            if args.sha256
            else client.get(args.image_id, args.namespace, model_version=args.model_version)
        )
    if args.json:
        _print(_jsonable(regions))
    else:
        sys.stdout.write(summaries.record_summary(regions) + "\n")
    return 0


def _jsonable(regions: dict[str, Any]) -> dict[str, Any]:
    """The decoded record with its arrays as lists (features as a nested list)."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in regions.items()}
