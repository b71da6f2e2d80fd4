"""Draw regions on an image: boxes with "attribute object" labels (``butd show``)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from store.records import FeatureRecord

# Distinct, readable outline colours, cycled over regions.
PALETTE = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
)


def region_labels(
    record: FeatureRecord, objects_vocab: Sequence[str], attributes_vocab: Sequence[str]
) -> list[str]:
    """ "attribute object" per region, e.g. "red car"; ids outside a vocabulary print as #id."""

    def name(vocab: Sequence[str], i: int) -> str:
        return vocab[i] if 0 <= i < len(vocab) else f"#{i}"

    return [
        f"{name(attributes_vocab, int(a))} {name(objects_vocab, int(o))}"
        for a, o in zip(record.attrs_id, record.objects_id, strict=True)
    ]


def draw_regions(
    image_bgr: np.ndarray,
    record: FeatureRecord,
    objects_vocab: Sequence[str],
    attributes_vocab: Sequence[str],
) -> Image.Image:
    """The image (RGB) with each region's box and label drawn, highest confidence on top."""
    canvas = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    labels = region_labels(record, objects_vocab, attributes_vocab)
    order = np.argsort(record.objects_conf, kind="stable")  # low first: best drawn last
    for rank, i in enumerate(order):
        colour = PALETTE[rank % len(PALETTE)]
        x1, y1, x2, y2 = (float(v) for v in record.boxes[i])
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        text = f"{labels[i]} {record.objects_conf[i]:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        draw.rectangle((left, top, right + 2, bottom), fill=colour)
        draw.text((x1 + 1, y1), text, fill=(0, 0, 0), font=font)
    return canvas
