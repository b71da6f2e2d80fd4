"""Draw regions on an image: boxes with "attribute object conf" labels (``butd show``).

Legibility rules: a scalable font (Pillow's bundled vector font) whose size follows the image,
box lines as thick as the image is large, every label kept inside the image and off the labels
already placed (the most confident regions are placed first; a label with no free spot near its
box is left out and counted), and by default only the regions at or above the confidence
threshold (``min_conf``; None draws every region).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from butd.store.records import FeatureRecord

# Distinct, readable colours, cycled over regions.
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
# Label text height as a fraction of the image's shorter side, and its floor in pixels (a
# 640x480 photo gets 17 px; a 160 px synthetic scene the 12 px floor).
FONT_FRACTION = 0.035
MIN_FONT_PX = 12
# Box outline width: the shorter side / this, at least 2 px.
LINE_DIVISOR = 250
# How far (in label heights) above or below its box a label may go when the spots at the box
# are taken; farther, a label would be read as another box's.
NEAR_ROWS = 3

Rect = tuple[float, float, float, float]  # x1, y1, x2, y2


@dataclass(frozen=True)
class Drawing:
    """The picture and what it shows."""

    image: Image.Image
    drawn: int  # regions drawn
    hidden: int  # regions under the threshold, not drawn
    unlabelled: int  # drawn regions whose label found no free spot
    labels: tuple[Rect, ...]  # where the labels went, in placing order


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


def label_font(width: int, height: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font at a size that follows the image."""
    return ImageFont.load_default(size=max(MIN_FONT_PX, round(min(width, height) * FONT_FRACTION)))


def draw_regions(
    image_bgr: np.ndarray,
    record: FeatureRecord,
    objects_vocab: Sequence[str],
    attributes_vocab: Sequence[str],
    *,
    min_conf: float | None = None,
) -> Drawing:
    """The image (RGB) with the boxes of the regions whose confidence is at least ``min_conf``
    (all when None) and their labels, placed most confident first."""
    canvas = Image.fromarray(np.ascontiguousarray(image_bgr[:, :, ::-1]))
    draw = ImageDraw.Draw(canvas)
    width, height = canvas.size
    font = label_font(width, height)
    line = max(2, round(min(width, height) / LINE_DIVISOR))
    conf = np.asarray(record.objects_conf, dtype=np.float64)
    order = [int(i) for i in np.argsort(-conf, kind="stable")]
    shown = [i for i in order if min_conf is None or conf[i] >= min_conf]
    colours = {i: PALETTE[rank % len(PALETTE)] for rank, i in enumerate(shown)}
    for i in reversed(shown):  # outlines first, the best on top; labels go over all of them
        draw.rectangle(_rect(record.boxes[i]), outline=colours[i], width=line)
    names = region_labels(record, objects_vocab, attributes_vocab)
    placed: list[Rect] = []
    unlabelled = 0
    for i in shown:
        text = f"{names[i]} {conf[i]:.2f}"
        spot = _place(draw, text, font, _rect(record.boxes[i]), (width, height), placed, line)
        if spot is None:
            unlabelled += 1
            continue
        placed.append(spot)
        draw.rectangle(spot, fill=colours[i])
        draw.text((spot[0] + line, spot[1]), text, fill=_ink(colours[i]), font=font)
    return Drawing(canvas, len(shown), len(order) - len(shown), unlabelled, tuple(placed))


def _rect(box: np.ndarray) -> Rect:
    x1, y1, x2, y2 = (float(v) for v in box)
    return x1, y1, x2, y2


def _place(
    draw: ImageDraw.ImageDraw,
    text: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    box: Rect,
    size: tuple[int, int],
    placed: list[Rect],
    pad: int,
) -> Rect | None:
    """The first candidate spot for the label of ``box`` that lies inside the image and
    overlaps no placed label: above the box, inside its top, below it, inside its bottom
    (left-aligned, then right-aligned), then the nearest free row through or near the box."""
    _, _, right, bottom = draw.textbbox((0, 0), text, font=font)
    w, h = right + 2 * pad, bottom + pad
    if w > size[0] or h > size[1]:
        return None
    x1, y1, x2, y2 = box
    corners = [(x, y) for x in (x1, x2 - w) for y in (y1 - h, y1, y2, y2 - h)]
    # Then rows through the box and up to NEAR_ROWS label heights beyond it, nearest first.
    rows = np.arange(y1 - NEAR_ROWS * h, y2 + NEAR_ROWS * h, h)
    corners += [(x, float(y)) for y in rows[np.argsort(np.abs(rows - y1))] for x in (x1, x2 - w)]
    for x, y in corners:
        x = min(max(x, 0.0), size[0] - w)
        y = min(max(y, 0.0), size[1] - h)
        spot = (x, y, x + w, y + h)
        if not any(_overlap(spot, other) for other in placed):
            return spot
    return None


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _ink(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black on light label colours, white on dark ones."""
    r, g, b = colour
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)
