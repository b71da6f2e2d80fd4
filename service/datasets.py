"""Turn a job request into image references: server paths under allowed roots, or an archive.

Path rule: every path (and every file found under a directory) is resolved with symlinks
followed; it must lie inside one of ``allowed_roots`` (also resolved) or the job is refused
(``PathNotAllowedError``, 403) with the offending path named. Relative paths are taken
relative to the first allowed root. ``..`` and symlinks are therefore harmless: what counts is
where the path really leads.

Archive rule: a .zip or .tar(.gz|.bz2|.xz) upload is unpacked into a fresh directory of the
store's job area. Only regular files are unpacked; absolute names, ``..`` components, links and
devices refuse the archive (``ArchiveError``, 422); member count and unpacked bytes are capped
and the bytes actually written are counted (a lying header does not get past the cap).
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

from butd.service.errors import InvalidRequestError, PathNotAllowedError
from butd.store import ids
from butd.store.image_ids import IdPolicy, ImageIdError
from butd.workers.protocol import JobItem

_COPY_CHUNK = 1 << 20
# The two ways past a refused server path, named in every refusal.
_WAYS_OUT = (
    "upload the files instead (`butd jobs submit PATH --upload`, or POST /v1/jobs with a "
    "multipart `archive`), or start the service with BUTD_ALLOWED_ROOTS naming the directories "
    "it may read (comma-separated)"
)


# Bounds of a server path in a job request (Linux: PATH_MAX 4096, NAME_MAX 255 bytes).
MAX_PATH_CHARS = 4096
MAX_COMPONENT_BYTES = 255


class ArchiveError(InvalidRequestError):
    """An uploaded archive that is unreadable, unsafe or too large."""

    code = "bad_archive"


class UnpackTooLargeError(ArchiveError):
    """The archive unpacks to more bytes than it may take."""


class BadPathError(InvalidRequestError):
    """A job path that cannot name a file: NUL byte, too long, a symlink loop, unreadable."""

    code = "bad_path"


def check_path_text(raw: str) -> None:
    """Refuse a path string no file system call should see (NUL, over the length caps).

    Raises:
        BadPathError: a NUL byte or a lone surrogate, over ``MAX_PATH_CHARS`` characters, or a
            component over ``MAX_COMPONENT_BYTES`` bytes of UTF-8.
    """
    shown = raw if len(raw) <= 80 else f"{raw[:80]}... ({len(raw)} characters)"
    if "\x00" in raw:
        raise BadPathError(f"path {shown!r} holds a NUL byte")
    if any("\ud800" <= c <= "\udfff" for c in raw):  # only JSON escapes can make one
        raise BadPathError(f"path {shown!r} holds a lone surrogate (not UTF-8)")
    if not raw or len(raw) > MAX_PATH_CHARS:
        raise BadPathError(f"a path is 1 to {MAX_PATH_CHARS} characters; got {shown!r}")
    for part in raw.split("/"):
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BadPathError(
                f"path {shown!r} has a component over {MAX_COMPONENT_BYTES} bytes "
                f"({part[:40]!r}...)"
            )


@dataclass
class Expansion:
    """Images found for a job and the files passed over."""

    items: list[JobItem] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def add(self, ref: str, relative: str, policy: IdPolicy | None) -> None:
        """The image at ``ref``, named by ``policy`` (default the ``path`` rule) from its
        ``relative`` path; a name the rule refuses is skipped with the reason."""
        try:
            named = (policy or IdPolicy()).image_id(relative)
        except ImageIdError as exc:
            self.skipped[relative] = str(exc)
            return
        self.items.append(JobItem(ref=ref, image_id=named))


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == root or path.is_relative_to(root) for root in roots)


def resolve_allowed(raw: str, roots: list[Path]) -> Path:
    """``raw`` with symlinks resolved, if it exists inside an allowed root.

    Raises:
        PathNotAllowedError: no roots configured, or the real path is outside every root.
        InvalidRequestError: the path does not exist.
    """
    if not roots:
        raise PathNotAllowedError(
            f"server paths are disabled (BUTD_ALLOWED_ROOTS is empty), so {raw!r} is not read: "
            f"{_WAYS_OUT}",
            server_paths="disabled",
        )
    check_path_text(raw)
    real_roots = [r.resolve() for r in roots]
    try:
        path = Path(raw).expanduser()
    except RuntimeError as exc:  # "~nobody/x": no such user's home
        raise BadPathError(f"path {raw!r} cannot be expanded: {exc}") from None
    if not path.is_absolute():
        path = real_roots[0] / path
    real = _resolved(path, raw)
    if not _inside(real, real_roots):
        shown = ", ".join(str(r) for r in real_roots)
        raise PathNotAllowedError(
            f"path {raw!r} resolves to {str(real)!r}, outside the allowed roots ({shown}): "
            f"{_WAYS_OUT}",
            server_paths="restricted",
        )
    try:
        real.stat()
    except FileNotFoundError:
        raise InvalidRequestError(f"path {raw!r} does not exist") from None
    except OSError as exc:
        raise BadPathError(f"path {raw!r} cannot be read: {exc.strerror}") from None
    return real


def _resolved(path: Path, raw: str) -> Path:
    """``path.resolve()``, with a loop or an unreadable directory as a BadPathError."""
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # RuntimeError: a symlink loop
        raise BadPathError(f"path {raw!r} cannot be resolved: {exc}") from None


def _walk(directory: Path) -> Iterator[Path]:
    """Files under ``directory``, sorted, symlinked directories not entered."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            yield Path(dirpath) / name


def expand(
    paths: list[str], roots: list[Path], suffixes: list[str], policy: IdPolicy | None = None
) -> Expansion:
    """Job items of ``paths``: a file as itself (its name), a directory recursively (the path
    relative to that directory, with ``/``), named by ``policy`` (``butd.store.image_ids``; default
    the ``path`` rule; a name the rule refuses is skipped with the reason); sorted, ids unique.

    Raises:
        PathNotAllowedError: a path or a file under a directory resolves outside the roots.
        InvalidRequestError: a missing path, a repeated image id, or no image at all.
    """
    wanted = {s.lower() for s in suffixes}
    out = Expansion()
    real_roots = [r.resolve() for r in roots]
    for raw in paths:
        base = resolve_allowed(raw, roots)
        files = [(base, base.name)] if base.is_file() else _dir_files(base, real_roots, out)
        for real, image_id in files:
            problem = ids.image_id_problem(image_id)
            if problem is not None:
                out.skipped[_shown(image_id)] = problem
                continue
            if real.suffix.lower() not in wanted:
                out.skipped[image_id] = f"suffix {real.suffix!r} is not an image suffix"
                continue
            out.add(str(real), image_id, policy)
    return _checked(out)


def _shown(image_id: str) -> str:
    """The id as listed in ``skipped``: escaped (``repr``) when it breaks the name rule, so the
    answer stays printable UTF-8 (a file name of non-UTF-8 bytes holds lone surrogates)."""
    if ids.image_id_problem(image_id) is None:
        return image_id
    return repr(image_id)[1:-1][: ids.MAX_IMAGE_ID_CHARS]


def _dir_files(base: Path, real_roots: list[Path], out: Expansion) -> list[tuple[Path, str]]:
    """(real path, image id) of the files under ``base``; a file whose link cannot be
    resolved (a loop) is passed over into ``out.skipped`` with the reason."""
    files = []
    for path in _walk(base):
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as exc:
            out.skipped[_shown(path.relative_to(base).as_posix())] = f"cannot be resolved: {exc}"
            continue
        if not _inside(real, real_roots):
            raise PathNotAllowedError(
                f"{str(path)!r} resolves to {str(real)!r}, outside the allowed roots"
            )
        files.append((real, path.relative_to(base).as_posix()))
    return sorted(files, key=lambda f: f[1])


def _checked(out: Expansion) -> Expansion:
    counts = Counter(item.image_id for item in out.items)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise InvalidRequestError(f"image ids occur twice in the job: {repeated[:5]}")
    if not out.items:
        raise InvalidRequestError("the job holds no image (no file with an image suffix)")
    return out


# --- archives ------------------------------------------------------------------------------


# What reading a hostile archive can raise besides ArchiveError: a damaged container or stream,
# an encrypted member (RuntimeError), an unsupported compression method (NotImplementedError),
# a bad header field (ValueError), a member name the file system refuses (OSError).
UNREADABLE: tuple[type[Exception], ...] = (
    zipfile.BadZipFile,
    tarfile.TarError,
    EOFError,
    OSError,
    RuntimeError,
    NotImplementedError,
    ValueError,
    zlib.error,
    lzma.LZMAError,
)


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps on an uploaded archive: member count and unpacked bytes."""

    max_members: int
    max_unpacked_bytes: int


def safe_member_name(name: str) -> PurePosixPath:
    """The member name as a relative path, or ArchiveError for absolute names and ``..``."""
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or name.startswith("/") or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveError(f"archive member {name!r} climbs out with '..'")
    if not path.parts:
        raise ArchiveError(f"archive member {name!r} has an empty name")
    return path


class _Budget:
    """Counts members and bytes written against ``ArchiveLimits``."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.bytes = 0

    def member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise ArchiveError(f"archive has over {self.limits.max_members} files (the limit)")

    def copy(self, src: IO[bytes], dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with dest.open("xb") as out:
            while chunk := src.read(_COPY_CHUNK):
                self.bytes += len(chunk)
                if self.bytes > self.limits.max_unpacked_bytes:
                    raise UnpackTooLargeError(
                        f"archive unpacks to over {self.limits.max_unpacked_bytes} bytes "
                        "(the limit)"
                    )
                out.write(chunk)


def _unpack_zip(archive: Path, dest: Path, budget: _Budget) -> None:
    with zipfile.ZipFile(archive) as zf:
        for info in zf.infolist():
            name = safe_member_name(info.filename)
            if info.is_dir():
                continue
            kind = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip tool set no type
            if kind not in (0, stat.S_IFREG):
                raise ArchiveError(f"archive member {info.filename!r} is not a regular file")
            budget.member()
            with zf.open(info) as src:
                budget.copy(src, dest / name)


def _unpack_tar(archive: Path, dest: Path, budget: _Budget) -> None:
    with tarfile.open(archive, mode="r:*") as tf:
        for member in tf:
            name = safe_member_name(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise ArchiveError(f"archive member {member.name!r} is a link or a device")
            budget.member()
            src = tf.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read")
            with src:
                budget.copy(src, dest / name)


def unpack(archive: Path, dest: Path, limits: ArchiveLimits) -> int:
    """Unpack a zip or tar archive into the new directory ``dest``; returns the file count.

    On any error ``dest`` is removed and ``ArchiveError`` raised.
    """
    dest.mkdir(parents=True, exist_ok=False)
    budget = _Budget(limits)
    try:
        if zipfile.is_zipfile(archive):
            _unpack_zip(archive, dest, budget)
        elif tarfile.is_tarfile(archive):
            _unpack_tar(archive, dest, budget)
        else:
            raise ArchiveError("the upload is neither a zip nor a tar archive")
    except UNREADABLE as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"cannot unpack the archive: {exc}") from exc
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return budget.members


# --- manifests ----------------------------------------------------------------------------


def manifest_path(jobs_dir: Path, job_id: str) -> Path:
    """Where the gateway keeps the item list of a job (for exports)."""
    return jobs_dir / "manifests" / f"{job_id}.json"


def write_manifest(jobs_dir: Path, job_id: str, namespace: str, items: list[JobItem]) -> None:
    """Save the job's namespace and image ids (tmp name, then atomic rename)."""
    path = manifest_path(jobs_dir, job_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    body = {"job_id": job_id, "namespace": namespace, "image_ids": [i.image_id for i in items]}
    tmp.write_text(json.dumps(body))
    tmp.replace(path)


def read_manifest(jobs_dir: Path, job_id: str) -> tuple[str, list[str]] | None:
    """(namespace, image ids) of a job, or None when the gateway never saw it."""
    path = manifest_path(jobs_dir, job_id)
    if not path.exists():
        return None
    body = json.loads(path.read_text())
    return str(body["namespace"]), [str(i) for i in body["image_ids"]]
