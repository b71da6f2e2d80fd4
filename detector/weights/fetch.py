"""Download a registry entry (resumable, verified), then convert it to a canonical file.

Flow: ``DIR/FILENAME.part`` grows with HTTP Range requests (a cut connection resumes from the
partial file's size; a server that ignores Range restarts it from zero) -> renamed to
``DIR/FILENAME`` when complete -> sha256 checked against the entry (when recorded; always
logged) -> converted to ``DIR/NAME.safetensors``.

On a sha256 mismatch the completed download is deleted: its bytes are wrong, and resuming
cannot repair a file that is already full length. A partial ``.part`` left by an interrupted
run is kept, and the next ``fetch`` continues it.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import httpx
from tqdm import tqdm

from butd.detector.weights.canonical import WeightsError, file_sha256, is_canonical_file
from butd.detector.weights.registry import RegistryEntry, canonical_path, load_vocab

logger = logging.getLogger(__name__)

RETRIES = 5  # resumptions per URL after a dropped connection
# Wait before the n-th resumption: BACKOFF_S * 2 ** (n - 1) seconds, at most BACKOFF_MAX_S (a
# dropped connection is often a brief outage; retrying in the same millisecond only repeats it).
BACKOFF_S = 1.0
BACKOFF_MAX_S = 30.0


def backoff_delays(retries: int, base_s: float = BACKOFF_S) -> list[float]:
    """Seconds waited before each of ``retries`` resumptions: 1, 2, 4, ... capped."""
    return [min(base_s * 2.0**n, BACKOFF_MAX_S) for n in range(retries)]


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


class _Restart(Exception):
    """The partial file cannot be continued (server sent another range): start over."""


def _content_range(header: str | None) -> tuple[int | None, int | None]:
    """(start, total) from ``bytes START-END/TOTAL`` or ``bytes */TOTAL``."""
    m = re.match(r"bytes (?:(\d+)-\d+|\*)/(\d+|\*)", header or "")
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _download_once(client: httpx.Client, url: str, part: Path, progress: bool) -> None:
    """One GET: continue ``part`` from its size when possible; raise if the body is cut."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with client.stream("GET", url, headers=headers) as resp:
        if resp.status_code == 416 and offset:
            if _content_range(resp.headers.get("content-range"))[1] == offset:
                return  # the partial file is already complete
            part.unlink()
            raise _Restart(f"server refused range {offset}-")
        resp.raise_for_status()
        if offset and resp.status_code == 206:
            if _content_range(resp.headers.get("content-range"))[0] != offset:
                part.unlink()
                raise _Restart("server answered another range")
            mode = "ab"
        else:
            if offset:
                logger.info("server ignored the Range request: restarting %s", part.name)
            offset, mode = 0, "wb"
        length = resp.headers.get("content-length")
        total = offset + int(length) if length is not None else None
        with (
            part.open(mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name,
                disable=not progress,
            ) as bar,
        ):
            for chunk in resp.iter_bytes():  # as received: a cut loses nothing written
                f.write(chunk)
                bar.update(len(chunk))
    size = part.stat().st_size
    if total is not None and size != total:
        raise httpx.RemoteProtocolError(f"body ended at {size} of {total} bytes")


def download(
    urls: tuple[str, ...],
    dest: Path,
    *,
    client: httpx.Client | None = None,
    progress: bool = True,
    retries: int = RETRIES,
) -> Path:
    """Download the first URL that works to ``dest`` (via ``dest.part``, resumable).

    Args:
        urls: tried in order; each gets ``retries`` resumptions after dropped connections.
        dest: final path; ``dest.part`` holds the bytes until the download is complete.
        client: an httpx client (default: one that follows redirects).
        progress: show a tqdm bar.
        retries: resumptions per URL.

    Returns:
        ``dest``.

    Raises:
        WeightsError: every URL failed (the message has each one's error).
    """
    own = client is None
    client = client or httpx.Client(follow_redirects=True, timeout=httpx.Timeout(30.0, read=300.0))
    part = dest.with_name(dest.name + ".part")
    errors = []
    delays = backoff_delays(retries)
    try:
        for url in urls:
            last = f"{url}: no attempt"
            for attempt in range(retries + 1):
                if attempt:
                    _sleep(delays[attempt - 1])
                try:
                    _download_once(client, url, part, progress)
                    part.replace(dest)
                    return dest
                except (httpx.TransportError, _Restart) as exc:
                    logger.warning(
                        "download of %s interrupted (%s), attempt %d/%d",
                        url,
                        exc,
                        attempt + 1,
                        retries + 1,
                    )
                    last = f"{url}: {exc}"
                except httpx.HTTPStatusError as exc:
                    last = f"{url}: HTTP {exc.response.status_code}"
                    break
            errors.append(last)
    finally:
        if own:
            client.close()
    raise WeightsError(f"download failed: {'; '.join(errors)} (partial data kept in {part})")


def _verified_sha256(entry: RegistryEntry, src: Path) -> str:
    """sha256 of the download, checked against the entry when recorded (mismatch: deleted)."""
    digest = file_sha256(src)
    if entry.sha256 is not None and digest != entry.sha256:
        src.unlink()
        raise WeightsError(
            f"{entry.name}: sha256 of {src.name} is {digest}, expected {entry.sha256}; "
            "the download was deleted"
        )
    logger.info("%s sha256 %s%s", src.name, digest, "" if entry.sha256 else " (not published)")
    return digest


def fetch(
    entry: RegistryEntry,
    dest_dir: Path | None = None,
    *,
    progress: bool = True,
    client: httpx.Client | None = None,
    keep_source: bool = False,
    retries: int = RETRIES,
) -> Path:
    """Make the entry's canonical file exist and return its path.

    Args:
        entry: registry entry (a packaged entry just resolves to its file).
        dest_dir: weights directory (default ``default_weights_dir()``).
        progress: tqdm bar during the download.
        client: httpx client (tests pass one; default follows redirects).
        keep_source: keep the downloaded original next to the canonical file.
        retries: resumptions per URL after a dropped connection.

    Returns:
        Path of the canonical ``.safetensors`` file.

    Raises:
        WeightsError: unsupported format, every URL failed, sha256 mismatch, or a file
            that does not fit the expected keys and shapes.
    """
    from butd.detector.weights.formats import convert

    out = canonical_path(entry, dest_dir)
    if entry.kind == "packaged" or is_canonical_file(out):
        if not out.is_file():
            raise WeightsError(f"packaged weights {entry.name!r} are missing: {out}")
        logger.info("%s already present: %s", entry.name, out)
        return out
    if not entry.convertible:
        raise WeightsError(f"{entry.name}: {entry.note}")
    dest_dir = out.parent
    dest_dir.mkdir(parents=True, exist_ok=True)
    src = dest_dir / entry.filename
    if not src.is_file():
        download(entry.urls, src, client=client, progress=progress, retries=retries)
    digest = _verified_sha256(entry, src)
    vocab = None
    if entry.vocab is not None:
        vocab = (load_vocab(entry.vocab[0]), load_vocab(entry.vocab[1]))
    convert(src, out, fmt=entry.format, arch=entry.arch, vocab=vocab,
            description=entry.description, source_sha256=digest)  # fmt: skip
    if not keep_source:
        src.unlink()
    return out
