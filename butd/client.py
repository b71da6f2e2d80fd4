"""Synchronous Python client of the butd gateway (httpx; no torch).

    from butd.client import Client

    with Client("http://127.0.0.1:8000") as c:
        regions = c.extract("dog.jpg", image_id="dog")      # dict with numpy arrays
        regions["features"].shape                           # (N, D) float16
        job = c.submit_job(["/data/coco/val2014"], namespace="coco")
        c.wait_job(job["job_id"])                           # progress bar
        c.export(job["job_id"], "h5-ragged", "val2014.h5")

Records come back as dicts: ``boxes (N,4) f32``, ``features (N,D)``, ``objects_id`` /
``attrs_id (N,) i64``, ``objects_conf`` / ``attrs_conf (N,) f32`` as numpy arrays, names and
provenance as plain values. ``to_record(d)`` turns one into a ``butd.store.records.FeatureRecord``.
Errors raise ``ButdError`` with the HTTP status, the error code and the server's message.
"""

from __future__ import annotations

import io
import os
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from butd.service.encoding import decode_features
from butd.store.records import FeatureRecord

# JSON fields that become numpy arrays, with their dtype.
_ARRAYS: dict[str, Any] = {
    "boxes": np.float32,
    "objects_id": np.int64,
    "objects_conf": np.float32,
    "attrs_id": np.int64,
    "attrs_conf": np.float32,
}
_TERMINAL = {"done", "failed", "cancelled"}


class ButdError(Exception):
    """An error answer of the gateway.

    Attributes:
        status_code: HTTP status.
        error: the error code (``body_too_large``, ``not_an_image``, ``overloaded``, ...).
        detail: the server's message.
        request_id: the request id, when the server gave one.
        retry_after: seconds to wait before retrying (503), else None.
        body: the whole JSON error body (some errors add fields, e.g. ``server_paths``).
    """

    def __init__(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = {"error": "http_error", "detail": response.text[:500]}
        self.body: dict[str, Any] = body if isinstance(body, dict) else {}
        self.status_code = response.status_code
        self.error = str(body.get("error", "http_error"))
        self.detail = str(body.get("detail", ""))
        self.request_id = body.get("request_id") or response.headers.get("x-request-id")
        retry = response.headers.get("retry-after")
        self.retry_after = float(retry) if retry and retry.isdigit() else None
        super().__init__(f"{self.status_code} {self.error}: {self.detail}")


def decode_record(body: dict[str, Any]) -> dict[str, Any]:
    """A features JSON body with its arrays decoded to numpy."""
    out = dict(body)
    for name, dtype in _ARRAYS.items():
        out[name] = np.asarray(body[name], dtype=dtype)
    out["boxes"] = out["boxes"].reshape(-1, 4)
    out["features"] = decode_features(body["features"])
    if body.get("grid") is not None:
        out["grid"] = decode_features(body["grid"])
    return out


def to_record(regions: dict[str, Any]) -> FeatureRecord:
    """A decoded features dict (``Client.extract`` / ``get``) as a FeatureRecord."""
    return FeatureRecord(
        image_id=str(regions["image_id"]),
        image_w=int(regions["image_w"]),
        image_h=int(regions["image_h"]),
        boxes=regions["boxes"],
        features=regions["features"],
        objects_id=regions["objects_id"],
        objects_conf=regions["objects_conf"],
        attrs_id=regions["attrs_id"],
        attrs_conf=regions["attrs_conf"],
        model_version=str(regions["model_version"]),
        grid=regions.get("grid"),
    )


class Client:
    """The gateway's HTTP API as Python calls.

    Args:
        base_url: gateway address, e.g. ``http://127.0.0.1:8000``.
        api_key: sent as ``Authorization: Bearer KEY`` when set.
        timeout: seconds per HTTP call.
        retries: times a 503 (overloaded) is retried after its ``Retry-After``.
        transport: an httpx transport (tests pass ``httpx.ASGITransport``).
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        retries: int = 0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retries = retries
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        for attempt in range(self.retries + 1):
            response = self._http.request(method, url, **kwargs)
            if response.status_code < 400:
                return response
            error = ButdError(response)
            if error.status_code != 503 or attempt == self.retries:
                raise error
            time.sleep(error.retry_after or 1.0)
        raise AssertionError("unreachable")

    # --- features ---------------------------------------------------------------------

    def extract(
        self,
        image: str | os.PathLike[str] | bytes,
        image_id: str | None = None,
        namespace: str | None = None,
        *,
        dtype: str = "float16",
        **options: int | float,
    ) -> dict[str, Any]:
        """Regions of one image (a path or its bytes); ``options`` = min_boxes, max_boxes,
        conf_thresh, grid_size (adds ``grid`` (G, G, D)). Cached images come back without
        reaching a worker (``cached`` True)."""
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        params: dict[str, Any] = {"dtype": dtype, **options}
        if image_id is not None:
            params["image_id"] = image_id
        if namespace is not None:
            params["namespace"] = namespace
        headers = {"Content-Type": "application/octet-stream"}
        response = self._request(
            "POST", "/v1/features", content=data, params=params, headers=headers
        )
        return decode_record(response.json())

    def get(
        self,
        image_id: str,
        namespace: str | None = None,
        *,
        dtype: str = "float16",
        model_version: str | None = None,
    ) -> dict[str, Any]:
        """Cached regions by the caller's image id (``ButdError`` 404 when unknown); a
        ``model_version`` other than the current one (e.g. a grid extraction's) reads that."""
        params: dict[str, Any] = {"dtype": dtype}
        if namespace is not None:
            params["namespace"] = namespace
        if model_version is not None:
            params["model_version"] = model_version
        return decode_record(self._request("GET", f"/v1/features/{image_id}", params=params).json())

    def get_by_sha256(self, sha256: str, *, dtype: str = "float16") -> dict[str, Any]:
        """Cached regions by the sha256 of the image bytes."""
        response = self._request("GET", f"/v1/features/sha256/{sha256}", params={"dtype": dtype})
        return decode_record(response.json())

    def get_npz(
        self,
        image_id: str,
        namespace: str | None = None,
        *,
        sha256: bool = False,
        model_version: str | None = None,
    ) -> bytes:
        """The cached record as .npz bytes (``image_id`` is a content hash when ``sha256``)."""
        url = f"/v1/features/sha256/{image_id}" if sha256 else f"/v1/features/{image_id}"
        params = {"namespace": namespace} if namespace and not sha256 else {}
        if model_version is not None:
            params["model_version"] = model_version
        headers = {"Accept": "application/x-npz"}
        return self._request("GET", url, params=params, headers=headers).content

    # --- heads --------------------------------------------------------------------------

    def caption(
        self,
        image_id: str | None = None,
        namespace: str | None = None,
        *,
        sha256: str | None = None,
        image: str | os.PathLike[str] | bytes | None = None,
        beam_size: int = 5,
        max_len: int = 20,
    ) -> dict[str, Any]:
        """A worker's caption of a stored image (by id or hash), or of ``image`` (a path or
        its bytes: extracted first unless cached). The answer has ``caption``, ``words``,
        ``attention`` (T, N) per word, ``boxes`` (N, 4) and ``num_boxes``."""
        params = {"beam_size": beam_size, "max_len": max_len}
        return self._heads("/v1/caption", image_id, namespace, sha256, image, params)

    def answer(
        self,
        question: str,
        image_id: str | None = None,
        namespace: str | None = None,
        *,
        sha256: str | None = None,
        image: str | os.PathLike[str] | bytes | None = None,
        top: int = 5,
    ) -> dict[str, Any]:
        """A worker's answer to ``question`` about an image named as in ``caption``: ``answer``,
        ``score``, the ``top`` ``answers`` and ``attention`` (G, N) per glimpse."""
        params: dict[str, Any] = {"question": question, "top": top}
        return self._heads("/v1/vqa", image_id, namespace, sha256, image, params)

    def _heads(
        self,
        url: str,
        image_id: str | None,
        namespace: str | None,
        sha256: str | None,
        image: str | os.PathLike[str] | bytes | None,
        params: dict[str, Any],
    ) -> dict[str, Any]:
        named = {"image_id": image_id, "namespace": namespace, "sha256": sha256}
        params.update({k: v for k, v in named.items() if v is not None})
        if image is None:
            if image_id is None and sha256 is None:
                raise ValueError("give image_id, sha256 or image")
            return dict(self._request("POST", url, params=params).json())
        data = image if isinstance(image, bytes) else Path(image).read_bytes()
        headers = {"Content-Type": "application/octet-stream"}
        return dict(self._request("POST", url, content=data, params=params, headers=headers).json())

    # --- jobs ---------------------------------------------------------------------------

    def submit_job(
        self,
        paths: Sequence[str | os.PathLike[str]],
        namespace: str = "default",
        *,
        idempotency_key: str | None = None,
        **options: int | float,
    ) -> dict[str, Any]:
        """Queue files / directories the *server* can read (under its allowed roots)."""
        body = {"paths": [str(p) for p in paths], "namespace": namespace, "options": options}
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return dict(self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def submit_archive(
        self,
        archive: str | os.PathLike[str] | bytes,
        namespace: str = "default",
        *,
        idempotency_key: str | None = None,
        **options: int | float,
    ) -> dict[str, Any]:
        """Upload a zip / tar of images as a job (image ids = member paths)."""
        data = archive if isinstance(archive, bytes) else Path(archive).read_bytes()
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        files = {"archive": ("dataset", data, "application/octet-stream")}
        response = self._request(
            "POST",
            "/v1/jobs",
            files=files,
            data={"namespace": namespace, **{k: str(v) for k, v in options.items()}},
            headers=headers,
        )
        return dict(response.json())

    def job(self, job_id: str) -> dict[str, Any]:
        """State, counts, errors, images/s and ETA of a job."""
        return dict(self._request("GET", f"/v1/jobs/{job_id}").json())

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; returns its status afterwards."""
        return dict(self._request("DELETE", f"/v1/jobs/{job_id}").json())

    def wait_job(
        self,
        job_id: str,
        *,
        progress: bool = True,
        poll_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Poll until the job is done, failed or cancelled; a tqdm bar shows done + failed."""
        status = self.job(job_id)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with tqdm(total=status["total"], unit="img", disable=not progress, desc=job_id[:12]) as bar:
            while True:
                bar.n = status["done"] + status["failed"]
                bar.set_postfix(failed=status["failed"], state=status["state"], refresh=False)
                bar.refresh()
                if status["state"] in _TERMINAL:
                    return status
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job_id} still {status['state']} after {timeout_s} s")
                time.sleep(poll_s)
                status = self.job(job_id)

    def export(
        self,
        job_id: str,
        format: str,
        out: str | os.PathLike[str],
        *,
        model_version: str | None = None,
        ids: str = "consumer",
        allow_padding: bool = False,
    ) -> Path:
        """Download a job's records in a store format to ``out`` (npz: a directory).

        Args:
            ids: ``consumer`` (ids as the format's consumer keys them) or ``stored``.
            allow_padding: ``h5-dense`` of an adaptive extraction pads with zero rows instead
                of being refused.

        Returns:
            ``out``. Written under a temporary name and renamed when complete.
        """
        out = Path(out)
        params: dict[str, str] = {"format": format, "ids": ids}
        if model_version:
            params["model_version"] = model_version
        if allow_padding:
            params["allow_padding"] = "true"
        tmp = out.with_name(out.name + ".part")
        with self._http.stream("GET", f"/v1/jobs/{job_id}/export", params=params) as response:
            if response.status_code >= 400:
                response.read()
                raise ButdError(response)
            with tmp.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        if format.startswith("npz"):
            _unzip_flat(tmp, out)
            tmp.unlink()
        else:
            tmp.replace(out)
        return out

    def export_to_url(
        self, job_id: str, format: str, url: str, *, model_version: str | None = None
    ) -> dict[str, Any]:
        """Have the gateway write a job's export to ``url`` (``s3://bucket/key``, under its
        ``BUTD_EXPORT_URLS``); returns ``{"url", "records", "bytes", "model_version"}``."""
        body = {"url": url, "format": format, "model_version": model_version}
        response = self._http.post(f"/v1/jobs/{job_id}/exports", json=body)
        if response.status_code >= 400:
            raise ButdError(response)
        written: dict[str, Any] = response.json()
        return written

    # --- health -------------------------------------------------------------------------

    def ready(self) -> dict[str, Any]:
        """The readiness report (does not raise on 503)."""
        return dict(self._http.get("/health/ready").json())


def _unzip_flat(archive: Path, out_dir: Path) -> None:
    """Unpack a flat zip (one npz per image, percent-encoded names) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = Path(info.filename).name  # flat by construction; never leave out_dir
            if not name or info.is_dir():
                continue
            with zf.open(info) as src, (out_dir / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)


def npz_to_dict(data: bytes) -> dict[str, Any]:
    """The arrays of a ``application/x-npz`` response (metadata stays a JSON string)."""
    with np.load(io.BytesIO(data)) as npz:
        return {k: npz[k] for k in npz.files}
