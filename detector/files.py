"""Extract image files into a feature file: discovery, resumption, per-image failures.

Used by ``butd extract``. An image that cannot be read or decoded is reported with its reason
and skipped; the others complete. Each stored image carries the sha256 of its file's bytes.
An image whose id is already in the output file is skipped only when its bytes have that same
hash, so an interrupted run resumes where it stopped; a different file under a stored id is
refused with a message (an append-only file cannot replace it), never silently skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from butd.detector.extractor import Extractor
from butd.images import ImageError, decode_image
from butd.store.image_ids import IdPolicy, ImageIdError
from butd.store.records import FeatureRecord, StoredRow

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)


@dataclass(frozen=True)
class ImageItem:
    """One image to extract: where it is and the id it is stored under."""

    path: Path
    image_id: str


@dataclass
class ExtractSummary:
    """What an extraction run did."""

    extracted: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    # Stored ids whose file now has other bytes: image id -> why it was not extracted.
    refused: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def find_images(paths: Iterable[str | Path], policy: IdPolicy | None = None) -> list[ImageItem]:
    """Image files under ``paths``, named by ``policy`` (default: the ``path`` rule).

    A directory contributes every image below it under its path relative to that directory
    (POSIX separators); a file contributes itself under its bare file name. The policy turns
    that relative name into the id (``butd.store.image_ids``). Order is sorted within each argument,
    so runs are reproducible.

    Raises:
        ImageIdError: names the rule cannot turn into ids (the count and the first few).
        ValueError: two images with the same id.
    """
    found: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(
                p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
            )
            found += [(p, p.relative_to(path).as_posix()) for p in files]
        elif path.is_file():
            found.append((path, path.name))
        else:
            raise FileNotFoundError(f"no such file or directory: {path}")
    items = _named(found, policy or IdPolicy())
    ids = [item.image_id for item in items]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)
        raise ValueError(f"several images share an id: {dupes[:5]}")
    return items


def _named(found: list[tuple[Path, str]], policy: IdPolicy) -> list[ImageItem]:
    items, refused = [], []
    for path, relative in found:
        try:
            items.append(ImageItem(path, policy.image_id(relative)))
        except ImageIdError as exc:
            refused.append(str(exc))
    if refused:
        raise ImageIdError(f"{len(refused)} of {len(found)} images have no id: {refused[0]}")
    return items


def load_boxes_file(path: str | Path) -> dict[str, np.ndarray]:
    """``{"a.jpg": [[x1, y1, x2, y2], ...]}`` -> {name: (N, 4) float32}, checked."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected an object mapping file names to box lists")
    boxes: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        array = np.asarray(value, dtype=np.float32)
        if array.ndim != 2 or array.shape[1] != 4 or len(array) == 0:
            raise ValueError(f"{path}: boxes of {name!r} must be a non-empty N x 4 list")
        if np.any(array[:, 2] < array[:, 0]) or np.any(array[:, 3] < array[:, 1]):
            raise ValueError(f"{path}: boxes of {name!r} need x2 >= x1 and y2 >= y1")
        boxes[name] = array
    return boxes


def extract_files(
    extractor: Extractor,
    items: Sequence[ImageItem],
    write: Callable[[list[StoredRow]], None],
    *,
    stored: Mapping[str, str] | None = None,
    boxes: dict[str, np.ndarray] | None = None,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> ExtractSummary:
    """Extract ``items`` not stored yet; ``write`` receives each batch's rows (records with
    their file's sha256).

    Args:
        stored: image id -> sha256 of the bytes it was extracted from ("" when not recorded),
            e.g. ``FeatureFileWriter.stored_sha256()``. A stored id is skipped when the file's
            bytes hash the same, and refused (``summary.refused``) otherwise.
    """
    summary = ExtractSummary()
    todo = _unstored(items, stored or {}, summary)
    start = time.perf_counter()
    for chunk in _chunks(todo, batch_size):
        decoded = _decode_all(chunk, summary.failed)
        rows = _extract_chunk(extractor, decoded, boxes or {})
        write(rows)
        summary.extracted += len(rows)
        if progress is not None:
            progress(len(chunk))
    summary.seconds = time.perf_counter() - start
    log.info(
        "extracted %d images (%d skipped, %d refused, %d failed) in %.1fs",
        summary.extracted,
        summary.skipped,
        len(summary.refused),
        len(summary.failed),
        summary.seconds,
    )
    return summary


def _unstored(
    items: Sequence[ImageItem], stored: Mapping[str, str], summary: ExtractSummary
) -> list[ImageItem]:
    """Items to extract; stored ones are counted as skipped (same bytes) or refused."""
    todo = []
    for item in items:
        old = stored.get(item.image_id)
        if old is None:
            todo.append(item)
            continue
        try:
            new = file_sha256(item.path)
        except OSError as exc:
            summary.failed[item.image_id] = f"{type(exc).__name__}: {exc}"
            continue
        if new == old:
            summary.skipped += 1
        else:
            summary.refused[item.image_id] = _refusal(old, new)
            log.warning("not extracting %s: %s", item.path, summary.refused[item.image_id])
    return todo


def _refusal(old: str, new: str) -> str:
    if not old:
        what = "is stored without a content hash (an older file), so it may be another image"
    else:
        what = f"is stored from other bytes (sha256 {old[:12]}..., this file {new[:12]}...)"
    return f"this id {what}; write to a new --out file, or rename the image"


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (hex), as stored in ``content_sha256``."""
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _chunks(items: Sequence[ImageItem], size: int) -> Iterator[Sequence[ImageItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _decode_all(
    chunk: Sequence[ImageItem], failed: dict[str, str]
) -> list[tuple[ImageItem, np.ndarray, str]]:
    """Decode each image on its own (with its bytes' sha256); a failure is recorded with its
    reason and skipped."""
    decoded = []
    for item in chunk:
        try:
            raw = item.path.read_bytes()
            decoded.append((item, decode_image(raw), hashlib.sha256(raw).hexdigest()))
        except (ImageError, OSError) as exc:
            failed[item.image_id] = f"{type(exc).__name__}: {exc}"
            log.warning("skipping %s: %s", item.path, exc)
    return decoded


def _extract_chunk(
    extractor: Extractor,
    decoded: list[tuple[ImageItem, np.ndarray, str]],
    boxes: dict[str, np.ndarray],
) -> list[StoredRow]:
    """Detected regions, or the caller's boxes for images named in the boxes file; each row
    carries its file's sha256 (``StoredRow.content_sha256``)."""
    free: list[tuple[ImageItem, np.ndarray]] = []
    given: list[tuple[ImageItem, np.ndarray, np.ndarray]] = []
    for item, image, _ in decoded:
        item_boxes = _boxes_for(item, boxes)
        if item_boxes is None:
            free.append((item, image))
        else:
            given.append((item, image, item_boxes))
    records: list[FeatureRecord] = extractor.extract(
        [im for _, im in free], [it.image_id for it, _ in free]
    )
    records += [extractor.extract_with_boxes(im, b, it.image_id) for it, im, b in given]
    sha = {item.image_id: digest for item, _, digest in decoded}
    return [StoredRow(record, sha[record.image_id]) for record in records]


def _boxes_for(item: ImageItem, boxes: dict[str, np.ndarray]) -> np.ndarray | None:
    """Boxes named by the image's id, or failing that by its bare file name."""
    return boxes.get(item.image_id, boxes.get(item.path.name))
