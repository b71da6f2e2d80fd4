"""``butd.detector.show.draw_regions``: labels inside the image, never on top of each other, a font
that grows with the image, and the confidence threshold."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from butd.detector.show import Rect, draw_regions
from butd.store.records import FeatureRecord

OBJECTS = [f"object{i}" for i in range(5)]
ATTRIBUTES = [f"colour{i}" for i in range(5)]


def _record(width: int, height: int, n: int, seed: int = 0) -> FeatureRecord:
    """``n`` boxes clustered in the top-right corner (labels there must go somewhere else)."""
    rng = np.random.default_rng(seed)
    x1 = rng.uniform(0.6, 0.9, n) * width
    y1 = rng.uniform(0.0, 0.2, n) * height
    boxes = np.stack([x1, y1, x1 + width * 0.1, y1 + height * 0.15], 1).clip(0, width - 1)
    return FeatureRecord(
        image_id="x",
        image_w=width,
        image_h=height,
        boxes=boxes.astype(np.float32),
        features=np.zeros((n, 4), np.float32),
        objects_id=rng.integers(0, 5, n),
        objects_conf=np.linspace(0.95, 0.05, n).astype(np.float32),
        attrs_id=rng.integers(0, 5, n),
        attrs_conf=np.full(n, 0.5, np.float32),
        model_version="v",
    )


def _image(width: int, height: int) -> np.ndarray:
    return np.full((height, width, 3), 90, np.uint8)


def _overlap(a: Rect, b: Rect) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize(("width", "height", "room"), [(640, 480, 8), (200, 150, 3)])
def test_labels_stay_inside_the_image_and_off_each_other(
    width: int, height: int, room: int
) -> None:
    """20 boxes in one corner: as many labels as fit near them (``room``), none overlapping."""
    record = _record(width, height, 20)
    drawing = draw_regions(_image(width, height), record, OBJECTS, ATTRIBUTES)
    assert drawing.image.size == (width, height)
    assert drawing.drawn == 20 and drawing.hidden == 0
    assert len(drawing.labels) + drawing.unlabelled == 20 and len(drawing.labels) >= room
    for x1, y1, x2, y2 in drawing.labels:
        assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    for a, b in itertools.combinations(drawing.labels, 2):
        assert not _overlap(a, b), (a, b)


def test_font_grows_with_the_image() -> None:
    small = draw_regions(_image(320, 240), _record(320, 240, 1), OBJECTS, ATTRIBUTES)
    large = draw_regions(_image(1280, 960), _record(1280, 960, 1), OBJECTS, ATTRIBUTES)
    (s,), (g,) = small.labels, large.labels
    assert (g[3] - g[1]) > 2.5 * (s[3] - s[1])  # label height: 4x the image, ~4x the text


def test_only_regions_reaching_the_threshold_unless_all() -> None:
    record = _record(400, 300, 10)  # confidences 0.95 ... 0.05 in ten steps of 0.1
    image = _image(400, 300)
    default = draw_regions(image, record, OBJECTS, ATTRIBUTES, min_conf=0.5)
    assert (default.drawn, default.hidden) == (5, 5)
    every = draw_regions(image, record, OBJECTS, ATTRIBUTES, min_conf=None)
    assert (every.drawn, every.hidden) == (10, 0)
    changed = np.asarray(every.image) != np.asarray(default.image)
    assert changed.any()  # the five extra boxes were drawn
