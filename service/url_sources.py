"""Job sources in object storage: ``s3://bucket/prefix`` (or any fsspec URL) as a job path.

URL rule: a URL is accepted only under one of ``BUTD_ALLOWED_URLS`` (prefixes compared after
normalising: scheme lower-cased, no ``.``/``..`` segments, no empty segment), the way a server
path must lie under ``BUTD_ALLOWED_ROOTS``. The objects under the prefix are listed once, at
submission; each becomes a job item whose ``ref`` is the object's URL (the worker reads it with
``butd.store.objects.read_url``) and whose id is the key relative to the prefix (``a/b.jpg``).
Credentials come from the store's standard environment (``AWS_ENDPOINT_URL``, ...).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from butd.service import datasets
from butd.service.errors import InvalidRequestError, ObjectStoreError, PathNotAllowedError
from butd.store import ids
from butd.store.image_ids import IdPolicy
from butd.store.objects import is_url, list_files


def normalised(url: str) -> str:
    """``url`` with its scheme lower-cased; refused when a segment is empty, ``.`` or ``..``
    (``file:///data`` and ``memory:///x`` keep their leading ``/``)."""
    scheme, sep, rest = url.partition("://")
    lead = "/" if rest.startswith("/") else ""
    parts = rest[len(lead) :].rstrip("/").split("/")
    if not sep or not rest or any(p in ("", ".", "..") for p in parts):
        raise InvalidRequestError(f"URL {url!r} must be scheme://bucket/key without ., .. or //")
    return f"{scheme.lower()}://{lead}{'/'.join(parts)}"


def check_allowed(url: str, allowed: Sequence[str], setting: str = "BUTD_ALLOWED_URLS") -> str:
    """The normalised ``url`` when it lies under an allowed prefix.

    Raises:
        PathNotAllowedError: no prefix configured (``setting`` is empty), or ``url`` is under
            none of them.
    """
    if not allowed:
        raise PathNotAllowedError(f"these URLs are disabled: {setting} is empty")
    got = normalised(url)
    for prefix in allowed:
        want = normalised(prefix)
        if got == want or got.startswith(want + "/"):
            return got
    shown = ", ".join(allowed)
    raise PathNotAllowedError(f"URL {url!r} is outside {setting} ({shown})")


def expand_urls(
    urls: Sequence[str],
    allowed: Sequence[str],
    suffixes: Sequence[str],
    policy: IdPolicy | None = None,
) -> datasets.Expansion:
    """Job items of the objects under each URL (sorted by key; ids unique across URLs), named
    by ``policy`` from the key relative to the URL, as ``datasets.expand`` names files from the
    path relative to their directory (default the ``path`` rule; a name the rule refuses is
    skipped with the reason).

    Raises:
        PathNotAllowedError: a URL outside the allowed prefixes.
        InvalidRequestError: nothing under a URL, or a repeated image id.
        ObjectStoreError: the store failed to list a prefix (502).
    """
    out = datasets.Expansion()
    for url in urls:
        checked = check_allowed(url, allowed)
        try:
            found, skipped = list_files(checked, suffixes)
        except (FileNotFoundError, ValueError) as exc:
            raise InvalidRequestError(f"cannot list {url!r}: {exc}") from exc
        except OSError as exc:
            raise ObjectStoreError(f"cannot list {url!r}: {exc}") from exc
        out.skipped.update({i: "suffix is not an image suffix" for i in skipped})
        for ref, image_id in found:
            problem = ids.image_id_problem(image_id)  # the same name rule as paths and uploads
            if problem is not None:
                out.skipped[repr(image_id)] = problem
                continue
            out.add(ref, image_id, policy)
    return out


def expand_any(
    paths: Sequence[str],
    roots: list[Path],
    allowed_urls: Sequence[str],
    suffixes: list[str],
    policy: IdPolicy | None = None,
) -> datasets.Expansion:
    """``datasets.expand`` for server paths plus ``expand_urls`` for URLs, in one job; both
    name their images by ``policy`` (the job's ``image_ids`` rule)."""
    urls = [p for p in paths if is_url(p)]
    local = [p for p in paths if not is_url(p)]
    out = datasets.Expansion()
    if local:
        out = datasets.expand(local, roots, suffixes, policy)
    if urls:
        remote = expand_urls(urls, allowed_urls, suffixes, policy)
        out.items.extend(remote.items)
        out.skipped.update(remote.skipped)
    return _checked(out)


def _checked(out: datasets.Expansion) -> datasets.Expansion:
    counts = Counter(item.image_id for item in out.items)
    repeated = sorted(i for i, n in counts.items() if n > 1)
    if repeated:
        raise InvalidRequestError(f"image ids occur twice in the job: {repeated[:5]}")
    if not out.items:
        raise InvalidRequestError("the job holds no image (no object with an image suffix)")
    return out
