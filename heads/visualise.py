"""Attention panels: one panel per generated word, regions shaded by their attention weight.

Shape glossary:
    N   regions,  T   words
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw


def attention_panels(
    image_bgr: np.ndarray,
    boxes: np.ndarray,
    words: Sequence[str],
    weights: np.ndarray,
    *,
    columns: int = 4,
    panel_width: int = 320,
) -> np.ndarray:
    """Draw T panels, each the image darkened outside the attended regions, with the word.

    Args:
        image_bgr: (H, W, 3) uint8 BGR image.
        boxes: (N, 4) x1, y1, x2, y2 in image pixels.
        words: T words (the caption, or the question's answer tokens).
        weights: (T, N) attention weights per word (rows need not be normalised).
        columns: panels per row of the grid.
        panel_width: width of each panel in pixels (aspect ratio kept).

    Returns:
        (rows·h, columns·panel_width, 3) uint8 BGR grid.
    """
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(words), len(boxes)):
        raise ValueError(f"weights must be (T={len(words)}, N={len(boxes)}); got {weights.shape}")
    rgb = Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1]))
    scale = panel_width / rgb.width
    size = (panel_width, max(1, round(rgb.height * scale)))
    base = rgb.resize(size)
    panels = [
        _panel(base, np.asarray(boxes, np.float32) * scale, w, wt)
        for w, wt in zip(words, weights, strict=True)
    ]
    rows = max(1, -(-len(panels) // columns))
    grid = Image.new("RGB", (columns * size[0], rows * size[1]))
    for i, p in enumerate(panels):
        grid.paste(p, ((i % columns) * size[0], (i // columns) * size[1]))
    return np.asarray(grid)[..., ::-1].copy()


def _panel(base: Image.Image, boxes: np.ndarray, word: str, weights: np.ndarray) -> Image.Image:
    """Brightness = 0.25 + 0.75 × (accumulated weight / max) per pixel."""
    heat = np.zeros((base.height, base.width), np.float32)
    for (x1, y1, x2, y2), w in zip(boxes, weights, strict=True):
        heat[int(max(y1, 0)) : int(np.ceil(y2)), int(max(x1, 0)) : int(np.ceil(x2))] += float(w)
    heat = heat / heat.max() if heat.max() > 0 else heat
    shade = 0.25 + 0.75 * heat[..., None]
    img = Image.fromarray((np.asarray(base, np.float32) * shade).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    best = int(np.argmax(weights)) if len(weights) else -1
    if best >= 0:
        draw.rectangle([float(v) for v in boxes[best]], outline=(255, 255, 0), width=2)
    draw.rectangle([0, 0, 8 * len(word) + 8, 16], fill=(0, 0, 0))
    draw.text((4, 2), word, fill=(255, 255, 255))
    return img
