"""Visual Genome reader: ``image_data.json`` + ``objects.json`` + ``attributes.json`` to boxes.

Reads the VG v1.2 / v1.4 release layout (and the synthetic scene sets ``butd.detector.synth`` writes
in the same layout) and maps object and attribute names onto a fixed vocabulary, the way the
original bottom-up-attention preprocessing (``data/genome/setup_vg.py`` + ``lib/datasets/vg.py``)
did:

* a vocabulary line may list comma-separated synonyms; every synonym maps to that line;
* names are lower-cased and stripped of surrounding whitespace before the lookup;
* an object's class is its first name (``names[0]``), dropped when outside the vocabulary;
* its attributes are those of its names that are in the attribute vocabulary, in file order,
  duplicates removed;
* a box ``x, y, w, h`` becomes ``x1 = max(0, x)``, ``y1 = max(0, y)``, ``x2 = min(W-1, x+w)``,
  ``y2 = min(H-1, y+h)`` (setup_vg.py writes ``xmax = x + w``; vg.py clips to ``W-1``); boxes
  left empty by the clip are dropped; objects repeating an ``object_id`` are read once.

Shape glossary:
    N   objects kept in one image
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vocab:
    """A vocabulary: one entry per line, each with its synonyms.

    Attributes:
        names: the canonical (first) name of each entry; id ``i`` is ``names[i]``.
        index: every normalised synonym -> its entry id (0-based).
    """

    names: tuple[str, ...]
    index: dict[str, int]

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Vocab:
        """Builds a vocabulary from ``objects_vocab.txt``-style lines (blank lines skipped)."""
        names: list[str] = []
        index: dict[str, int] = {}
        for line in lines:
            synonyms = [normalise(s) for s in line.split(",") if normalise(s)]
            if not synonyms:
                continue
            for s in synonyms:
                index.setdefault(s, len(names))
            names.append(synonyms[0])
        return cls(names=tuple(names), index=index)

    @classmethod
    def from_file(cls, path: str | Path) -> Vocab:
        """Reads a vocabulary file (UTF-8, one entry per line)."""
        return cls.from_lines(Path(path).read_text(encoding="utf-8").splitlines())

    def lookup(self, name: str) -> int | None:
        """0-based id of ``name`` (any synonym, any case), or None when outside the vocabulary."""
        return self.index.get(normalise(name))

    def __len__(self) -> int:
        return len(self.names)


def normalise(name: str) -> str:
    """The original preprocessing's name normalisation: lower case, outer whitespace stripped."""
    return name.lower().strip()


@dataclass(frozen=True)
class VGImage:
    """Ground truth of one image.

    Attributes:
        image_id: the dataset's integer id.
        path: the image file.
        width: image width in pixels.
        height: image height in pixels.
        boxes: (N, 4) float32 ``x1, y1, x2, y2`` in image pixels (inclusive, +1 convention).
        classes: (N,) int64 0-based object ids (background excluded).
        attributes: N tuples of 0-based attribute ids (possibly empty), in file order.
    """

    image_id: int
    path: Path
    width: int
    height: int
    boxes: npt.NDArray[np.float32]
    classes: npt.NDArray[np.int64]
    attributes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        n = len(self.classes)
        if self.boxes.shape != (n, 4) or len(self.attributes) != n:
            raise ValueError(
                f"image {self.image_id}: boxes {self.boxes.shape}, {n} classes and "
                f"{len(self.attributes)} attribute lists must agree"
            )


def read_json(path: Path) -> Any:
    """Loads a JSON file."""
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def resolve_image_path(root: Path, entry: dict[str, Any]) -> Path:
    """Finds the file of an ``image_data.json`` entry under ``root``.

    Tries, in order: the last two components of ``url`` (``VG_100K/1.jpg``), its basename,
    ``images/<basename>``, and ``<image_id>.jpg``. Returns the first candidate when none exists.
    """
    url = str(entry.get("url", "") or entry.get("file_name", ""))
    parts = [p for p in url.replace("\\", "/").split("/") if p]
    candidates = []
    if len(parts) >= 2:
        candidates.append(root / parts[-2] / parts[-1])
    if parts:
        candidates += [root / parts[-1], root / "images" / parts[-1]]
    candidates.append(root / f"{entry['image_id']}.jpg")
    for c in candidates:
        if c.exists():
            return c
    return candidates[0]


def _attributes_by_object(attributes_json: Sequence[dict[str, Any]] | None) -> dict[int, list[str]]:
    """object_id -> attribute strings, merged over every image of ``attributes.json``."""
    out: dict[int, list[str]] = {}
    for image in attributes_json or ():
        for obj in image.get("attributes", ()) or ():
            names = obj.get("attributes") or []
            out.setdefault(int(obj["object_id"]), []).extend(str(a) for a in names)
    return out


def _box(obj: dict[str, Any], width: int, height: int) -> tuple[float, float, float, float]:
    x, y, w, h = (float(obj[k]) for k in ("x", "y", "w", "h"))
    return max(0.0, x), max(0.0, y), min(width - 1.0, x + w), min(height - 1.0, y + h)


def _object_name(obj: dict[str, Any]) -> str | None:
    names = obj.get("names") or ([obj["name"]] if "name" in obj else [])
    return str(names[0]) if names else None


def _attribute_ids(names: Iterable[str], vocab: Vocab) -> tuple[int, ...]:
    ids: list[int] = []
    for a in names:
        i = vocab.lookup(a)
        if i is not None and i not in ids:
            ids.append(i)
    return tuple(ids)


def parse_image(
    entry: dict[str, Any],
    objects: Sequence[dict[str, Any]],
    attrs_by_object: dict[int, list[str]],
    objects_vocab: Vocab,
    attributes_vocab: Vocab,
    root: Path,
) -> VGImage:
    """One image's ground truth from its ``image_data`` entry and ``objects`` list."""
    width, height = int(entry["width"]), int(entry["height"])
    seen: set[int] = set()
    boxes, classes, attributes = [], [], []
    for obj in objects:
        oid = int(obj.get("object_id", -1))
        name = _object_name(obj)
        cls = objects_vocab.lookup(name) if name is not None else None
        if cls is None or (oid >= 0 and oid in seen):
            continue
        x1, y1, x2, y2 = _box(obj, width, height)
        if x2 < x1 or y2 < y1:
            continue
        seen.add(oid)
        boxes.append((x1, y1, x2, y2))
        classes.append(cls)
        attributes.append(
            _attribute_ids(attrs_by_object.get(oid, obj.get("attributes") or []), attributes_vocab)
        )
    return VGImage(
        image_id=int(entry["image_id"]),
        path=resolve_image_path(root, entry),
        width=width,
        height=height,
        boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        classes=np.asarray(classes, dtype=np.int64),
        attributes=tuple(attributes),
    )


def load_vg(
    root: str | Path,
    objects_vocab: Vocab | None = None,
    attributes_vocab: Vocab | None = None,
    *,
    keep_empty: bool = False,
) -> list[VGImage]:
    """Reads a Visual Genome style directory.

    Args:
        root: directory with ``image_data.json``, ``objects.json`` and (optionally)
            ``attributes.json``; image files as ``resolve_image_path`` finds them.
        objects_vocab: object vocabulary; default ``root/objects_vocab.txt``.
        attributes_vocab: attribute vocabulary; default ``root/attributes_vocab.txt``.
        keep_empty: keep images left with no object in the vocabulary (the original training
            set drops them).

    Returns:
        One ``VGImage`` per image of ``image_data.json`` (that has an ``objects.json`` entry), in
        ``image_data.json`` order.
    """
    root = Path(root)
    objects_vocab = objects_vocab or Vocab.from_file(root / "objects_vocab.txt")
    attributes_vocab = attributes_vocab or Vocab.from_file(root / "attributes_vocab.txt")
    attr_path = root / "attributes.json"
    attrs_by_object = _attributes_by_object(read_json(attr_path) if attr_path.exists() else None)
    objects_by_image = {
        int(o["image_id"]): o.get("objects", []) for o in read_json(root / "objects.json")
    }
    images = []
    for entry in read_json(root / "image_data.json"):
        image_id = int(entry.get("image_id", entry.get("id", -1)))
        entry = {**entry, "image_id": image_id}
        if image_id not in objects_by_image:
            continue
        image = parse_image(
            entry,
            objects_by_image[image_id],
            attrs_by_object,
            objects_vocab,
            attributes_vocab,
            root,
        )
        if len(image.classes) or keep_empty:
            images.append(image)
    logger.info(
        "read %d images, %d objects from %s", len(images), sum(len(i.classes) for i in images), root
    )
    return images
