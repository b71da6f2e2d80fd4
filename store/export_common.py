"""What every exporter shares: atomic output, progress callbacks, and the ids each consumer
looks images up by (``butd.store.image_ids``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from butd.store.h5 import FeatureFile
from butd.store.image_ids import consumer_keys

Progress = Callable[[int], None]

CONSUMERS: dict[str, tuple[str, str]] = {
    "h5-dense": ("int", "bottom-up-attention-vqa's dataset looks up int COCO ids"),
    "h5-ragged": ("int", "ban-vqa's adaptive dataset looks up int COCO ids"),
    "tsv": ("int", "generate_tsv readers call int(image_id)"),
    "lxmert-tsv": ("stem", "LXMERT matches img_id to the file stem"),
    "npz": ("stem", "MILVLG's extractor names files by stem"),
    "npz-mcan": ("int", "MCAN / OpenVQA parse int ids from file names"),
    "h5-grid": ("int", "grid-feature caption code reads f'{coco_id}_grids'"),
}
"""format -> (key style of ``butd.store.image_ids``, who reads the ids that way)."""


@contextlib.contextmanager
def atomic(out: Path) -> Iterator[Path]:
    """Yield a temp path beside ``out``; rename it to ``out`` on success, delete it on error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def export_keys(ff: FeatureFile, fmt: str, ids: str = "consumer") -> list[Any]:
    """The ids ``fmt``'s consumer looks images up by (``ids="stored"``: the stored ids).

    Raises:
        ImageIdError: a stored id the consumer's key style cannot express (the message names
            the rule, the id and the option that fixes it).
    """
    style, consumer = CONSUMERS[fmt]
    if ids not in ("consumer", "stored"):
        raise ValueError(f"ids must be 'consumer' or 'stored'; got {ids!r}")
    return consumer_keys(ff.ids(), "stored" if ids == "stored" else style, ff.id_policy,
                         f"{fmt} ({consumer})")  # fmt: skip
