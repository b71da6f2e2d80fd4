"""Read an upload from a request: multipart ``file`` part or a raw image body, size-limited.

The limit is checked on ``Content-Length`` before anything is read and again on the bytes
actually received (a chunked body without a length is read only up to the limit + 1 byte).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Request
from starlette.datastructures import UploadFile

from butd.service.errors import BodyTooLargeError, InvalidRequestError, UnsupportedMediaError

_CHUNK = 1 << 20
# Content types accepted as a raw image body (besides image/*).
RAW_TYPES = ("application/octet-stream",)


@dataclass(frozen=True)
class Body:
    """The uploaded bytes and the other form fields (empty for a raw body)."""

    data: bytes
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None


def _too_large(size: int, limit: int) -> BodyTooLargeError:
    return BodyTooLargeError(
        f"request body is {size} bytes; the limit is {limit} bytes", size=size, limit=limit
    )


def check_length(request: Request, limit: int) -> None:
    """Refuse a declared ``Content-Length`` over ``limit`` before reading anything."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)


async def read_raw(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def read_multipart(request: Request, limit: int, part: str) -> Body:
    """The file part named ``part`` of a multipart form and the text fields beside it."""
    form = await request.form(max_files=1, max_fields=32)
    upload = form.get(part)
    if not isinstance(upload, UploadFile):
        raise UnsupportedMediaError(f"multipart body has no file part named {part!r}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise _too_large(upload.size or len(data), limit)
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    await form.close()
    return Body(data=data, fields=fields, filename=upload.filename)


@dataclass(frozen=True)
class SavedPart:
    """A file part written to disk: the text fields beside it, its size and sha256."""

    fields: dict[str, str]
    size: int
    sha256: str


async def save_multipart(request: Request, part: str, dest: Path, limit: int) -> SavedPart:
    """Copy the file part ``part`` to ``dest`` in chunks (never whole in memory), hashing it.

    Returns:
        The text fields beside the file, its size and its sha256.

    Raises:
        UnsupportedMediaError: no such file part (415).
        BodyTooLargeError: the file is over ``limit`` bytes (413); ``dest`` is removed.
    """
    form = await request.form(max_files=1, max_fields=32)
    try:
        upload = form.get(part)
        if not isinstance(upload, UploadFile):
            raise UnsupportedMediaError(f"multipart body has no file part named {part!r}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        size, digest = 0, hashlib.sha256()
        with dest.open("wb") as out:
            while chunk := await upload.read(_CHUNK):
                size += len(chunk)
                if size > limit:
                    break
                digest.update(chunk)
                out.write(chunk)
        if size > limit:
            dest.unlink(missing_ok=True)
            raise _too_large(size, limit)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        return SavedPart(fields, size, digest.hexdigest())
    finally:
        await form.close()


async def read_image_body(request: Request, limit: int) -> Body:
    """The uploaded image: multipart ``file`` part, or the whole body (image/*, octets, none).

    Raises:
        BodyTooLargeError: over ``limit`` bytes (413).
        UnsupportedMediaError: another content type, or no ``file`` part (415).
        InvalidRequestError: an empty upload (422).
    """
    check_length(request, limit)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        body = await read_multipart(request, limit, "file")
    elif ctype.startswith("image/") or ctype in RAW_TYPES or not ctype:
        body = Body(data=await read_raw(request, limit))
    else:
        raise UnsupportedMediaError(
            f"Content-Type {ctype or '(none)'!r} is not an image upload; send "
            "multipart/form-data with a 'file' part, image/*, or application/octet-stream"
        )
    if not body.data:
        raise InvalidRequestError("the uploaded image is empty (0 bytes)")
    return body
