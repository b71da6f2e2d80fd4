"""Image ids: how a file becomes an id (one rule, chosen once), and how stored ids become the
keys each consumer looks up.

Rules (``butd extract --image-ids RULE``, batch jobs' ``image_ids``, uploads' ``id_rule``):

* ``path`` (default): the path relative to the directory argument (``val2014/a.jpg`` -> ``a.jpg``
  for ``butd extract val2014/``; a file argument is its bare name).
* ``stem``: the file name without directories and extension (``COCO_val2014_000000000042``).
* ``coco``: ``COCO_{split}_{digits}.{ext}`` -> the integer (``"42"``), and any name that is an
  integer (``000001.jpg`` -> ``"1"``); any other name is refused.
* ``map``: a JSON file ``{"relative/path.jpg": "id", ...}`` (keys may also be bare file names);
  a file the mapping does not name is refused.

The rule is recorded in the feature file (root attribute ``image_id_policy``, JSON: ``rule``,
``coco_splits`` seen, ``map_file``), so exports and heads know what the ids mean.

Consumer key styles (``consumer_keys``):

* ``int``: generate_tsv readers call ``int(image_id)`` (bottom-up-attention-vqa, ban-vqa,
  self-critical's ``make_bu_data.py``; their ``*_imgid2idx.pkl`` is keyed by the COCO integer).
* ``stem``: LXMERT's ``img_id`` (``COCO_val2014_000000000042``) and MILVLG's extractor (file
  stem). A ``coco``-rule id is written back as ``COCO_{split}_{012d}`` when one split was seen.
* ``stored``: the stored id unchanged.

An id that cannot be written in a style raises ``ImageIdError`` naming the rule, the id and the
option that fixes it; two ids that would share a key are refused the same way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

RULES = ("path", "stem", "coco", "map")
STYLES = ("int", "stem", "stored")
POLICY_ATTR = "image_id_policy"
_COCO = re.compile(r"^COCO_(?P<split>[A-Za-z]+[0-9]*)_(?P<num>[0-9]+)(?:\.[A-Za-z0-9]+)?$")
_INT_NAME = re.compile(r"^(?P<num>[0-9]+)(?:\.[A-Za-z0-9]+)?$")
_FIX = (
    "re-extract with `butd extract --image-ids coco` (COCO-named or integer-named files) or "
    "`--image-ids map --id-map FILE.json`, or export with `--ids stored` to keep the stored ids"
)


class ImageIdError(ValueError):
    """An id that a rule or a consumer's key style cannot take; the message says which and why."""


def _base(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).name


def coco_parts(name: str) -> tuple[str, int] | None:
    """``(split, n)`` of a COCO file name or id (``COCO_val2014_000000000042[.jpg]``), else None;
    ``("", n)`` for a name that is an integer (``000001.jpg``, ``"42"``). Directories ignored."""
    base = _base(name)
    found = _COCO.match(base)
    if found is not None:
        return found["split"], int(found["num"])
    found = _INT_NAME.match(base)
    return ("", int(found["num"])) if found is not None else None


def stem(name: str) -> str:
    """File name without directories and its last extension (``a/b.c.jpg`` -> ``b.c``)."""
    base = _base(name)
    return base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base


@dataclass(frozen=True)
class IdPolicy:
    """The rule that names images, and the mapping of the ``map`` rule.

    Args:
        rule: one of ``RULES``.
        mapping: ``map`` rule: relative path (or bare file name) -> id.
        map_file: where the mapping came from (recorded in the metadata).
    """

    rule: str = "path"
    mapping: Mapping[str, str] = field(default_factory=dict)
    map_file: str = ""

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ImageIdError(f"unknown image id rule {self.rule!r}; choose one of {RULES}")
        if self.rule == "map" and not self.mapping:
            raise ImageIdError("image id rule 'map' needs a mapping file (--id-map FILE.json)")

    @classmethod
    def load(cls, rule: str, map_file: str | Path | None = None) -> IdPolicy:
        """The policy of ``rule``; ``map`` reads ``map_file`` (a JSON object of strings)."""
        if rule != "map":
            if map_file is not None:
                raise ImageIdError("--id-map is only read with --image-ids map")
            return cls(rule)
        if map_file is None:
            raise ImageIdError("image id rule 'map' needs a mapping file (--id-map FILE.json)")
        raw = json.loads(Path(map_file).read_text())
        if not isinstance(raw, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in raw.items()
        ):
            raise ImageIdError(f"{map_file}: expected a JSON object of file name -> id strings")
        return cls("map", {k: str(v) for k, v in raw.items()}, str(map_file))

    def image_id(self, relative: str) -> str:
        """The id of the file at ``relative`` (POSIX path relative to its directory argument).

        Raises:
            ImageIdError: ``coco`` on a name that is neither COCO nor an integer; ``map`` on a
                file the mapping does not name.
        """
        if self.rule == "path":
            return relative
        if self.rule == "stem":
            return stem(relative)
        if self.rule == "coco":
            parts = coco_parts(relative)
            if parts is None:
                raise ImageIdError(
                    f"image id rule coco: {relative!r} is neither COCO_{{split}}_{{012d}}.jpg "
                    "nor an integer file name; use --image-ids path|stem or a mapping file"
                )
            return str(parts[1])
        found = self.mapping.get(relative, self.mapping.get(_base(relative)))
        if found is None:
            raise ImageIdError(f"image id rule map: {self.map_file} has no id for {relative!r}")
        return found

    def metadata(self, relatives: Iterable[str]) -> dict[str, Any]:
        """What the feature file records: the rule, the COCO splits seen, the mapping file."""
        meta: dict[str, Any] = {"rule": self.rule}
        if self.rule == "coco":
            splits = {p[0] for p in map(coco_parts, relatives) if p is not None and p[0]}
            meta["coco_splits"] = sorted(splits)
        if self.map_file:
            meta["map_file"] = self.map_file
        return meta


def merge_metadata(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The recorded policy after appending with ``new`` to a file recorded with ``old``.

    Raises:
        ImageIdError: the rules differ (a file holds ids of one rule).
    """
    if old.get("rule") != new.get("rule"):
        raise ImageIdError(
            f"the file's ids were made with --image-ids {old.get('rule')}; this run uses "
            f"--image-ids {new.get('rule')}: use the same rule, or another output file"
        )
    merged = dict(new)
    if "coco_splits" in old or "coco_splits" in new:
        merged["coco_splits"] = sorted({*old.get("coco_splits", ()), *new.get("coco_splits", ())})
    return merged


def _int_key(image_id: str, rule: str, consumer: str) -> int:
    parts = coco_parts(image_id)
    if parts is None:
        raise ImageIdError(
            f"{consumer} looks images up by integer id (int(image_id)); the stored id "
            f"{image_id!r} (rule {rule}) is not an integer, a COCO_{{split}}_{{012d}}.jpg name "
            f"or an integer file name: {_FIX}"
        )
    return parts[1]


def _stem_key(image_id: str, policy: Mapping[str, Any], consumer: str) -> str:
    splits = policy.get("coco_splits", [])
    if policy.get("rule") == "coco" and image_id.isdigit() and splits:
        if len(splits) > 1:
            raise ImageIdError(
                f"{consumer} looks images up by file stem (COCO_{{split}}_{{012d}}); the stored "
                f"id {image_id!r} (rule coco) came from several splits {splits}, so its split is "
                "lost: re-extract with `butd extract --image-ids stem`, or one file per split"
            )
        return f"COCO_{splits[0]}_{int(image_id):012d}"
    return stem(image_id)


def consumer_keys(
    ids: Sequence[str], style: str, policy: Mapping[str, Any], consumer: str
) -> list[Any]:
    """The keys ``consumer`` would look ``ids`` up by, in ``style`` (ints for ``int``).

    Args:
        ids: stored ids, in file order.
        style: ``int``, ``stem`` or ``stored``.
        policy: the file's recorded policy (``FeatureFile.id_policy``).
        consumer: named in error messages ("tsv (bottom-up-attention-vqa, ...)").

    Raises:
        ImageIdError: an id the style cannot express, or two ids with the same key.
    """
    rule = str(policy.get("rule", "unrecorded"))
    if style == "stored":
        keys: list[Any] = list(ids)
    elif style == "int":
        keys = [_int_key(i, rule, consumer) for i in ids]
    elif style == "stem":
        keys = [_stem_key(i, policy, consumer) for i in ids]
    else:
        raise ValueError(f"unknown id style {style!r}; choose one of {STYLES}")
    seen: dict[Any, str] = {}
    for image_id, key in zip(ids, keys, strict=True):
        if key in seen:
            raise ImageIdError(
                f"{consumer}: stored ids {seen[key]!r} and {image_id!r} (rule {rule}) both "
                f"become the key {key!r}; {_FIX}"
            )
        seen[key] = image_id
    return keys


def _join_keys(image_id: str) -> set[str]:
    """The spellings one image goes by: the id, its stem, and its integer (COCO / integer)."""
    keys = {image_id, stem(image_id)}
    parts = coco_parts(image_id)
    if parts is not None:
        keys.add(str(parts[1]))
    return keys


@dataclass(frozen=True)
class IdJoin:
    """Annotation ids joined to stored ids: ``matched`` (annotation id -> stored id), the
    annotation ids with no features, and one example id of each side for messages."""

    matched: dict[str, str]
    missing: list[str]
    wanted: int
    example_wanted: str
    example_stored: str
    rule: str

    def summary(self, where: str) -> str:
        """ "612 of 640 annotated images have features in f.h5; ..." with an id of each side."""
        return (
            f"{len(self.matched)} of {self.wanted} annotated images have features in {where} "
            f"(annotation ids look like {self.example_wanted!r}, stored ids like "
            f"{self.example_stored!r}, rule {self.rule})"
            + (f"; no features for e.g. {self.missing[0]!r}" if self.missing else "")
        )


def join_ids(wanted: Iterable[str], stored: Iterable[str], rule: str = "unrecorded") -> IdJoin:
    """Join annotation ids (COCO / VQA integers, synth "1", LXMERT stems) to stored ids.

    An exact match wins; otherwise an annotation id matches the stored id that has the same
    stem or the same integer (``42`` <-> ``COCO_val2014_000000000042.jpg``, ``1`` <->
    ``000001.jpg``), when exactly one stored id does.
    """
    stored = list(stored)
    exact = set(stored)
    by_key: dict[str, str | None] = {}
    for image_id in stored:
        for key in _join_keys(image_id):
            by_key[key] = image_id if by_key.get(key, image_id) == image_id else None
    matched: dict[str, str] = {}
    missing: list[str] = []
    unique = list(dict.fromkeys(wanted))
    for image_id in unique:
        found = image_id if image_id in exact else None
        for key in sorted(_join_keys(image_id)) if found is None else ():
            found = found or by_key.get(key)
        if found is None:
            missing.append(image_id)
        else:
            matched[image_id] = found
    return IdJoin(
        matched, missing, len(unique), unique[0] if unique else "", stored[0] if stored else "",
        rule,
    )  # fmt: skip
