"""Attention panels: one panel per generated word, regions shaded by their attention weight,
or, for a head over grid features, the G x G attention as a heat map over the image.

Shape glossary:
    N   regions,  T   words,  G   grid side (N = G*G cells, row-major)
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


def grid_attention_panels(
    image_bgr: np.ndarray,
    words: Sequence[str],
    weights: np.ndarray,
    grid_size: int,
    *,
    columns: int = 4,
    panel_width: int = 320,
) -> np.ndarray:
    """Draw T panels, each the image under a heat map of one word's grid attention.

    Args:
        image_bgr: (H, W, 3) uint8 BGR image.
        words: T words.
        weights: (T, G*G) attention over the row-major grid cells.
        grid_size: G.

    Returns:
        (rows·h, columns·panel_width, 3) uint8 BGR grid of panels; each panel's heat (bilinear
        upsampling of the G x G weights, divided by their max) runs from the image itself (0)
        to a red-yellow overlay (the most attended cell); the word is written top left.
    """
    weights = np.asarray(weights, np.float32)
    if weights.shape != (len(words), grid_size * grid_size):
        raise ValueError(
            f"weights must be (T={len(words)}, G*G={grid_size * grid_size}); got {weights.shape}"
        )
    rgb = Image.fromarray(np.ascontiguousarray(image_bgr[..., ::-1]))
    size = (panel_width, max(1, round(rgb.height * panel_width / rgb.width)))
    base = np.asarray(rgb.resize(size), np.float32)
    panels = [_heat_panel(base, w, wt.reshape(grid_size, grid_size)) for w, wt in zip(
        words, weights, strict=True)]  # fmt: skip
    rows = max(1, -(-len(panels) // columns))
    grid = Image.new("RGB", (columns * size[0], rows * size[1]))
    for i, p in enumerate(panels):
        grid.paste(p, ((i % columns) * size[0], (i // columns) * size[1]))
    return np.asarray(grid)[..., ::-1].copy()


def _heat_panel(base: np.ndarray, word: str, cells: np.ndarray) -> Image.Image:
    """base (h, w, 3) RGB float; cells (G, G) weights -> the panel."""
    h, w = base.shape[:2]
    peak = float(cells.max())
    norm = cells / peak if peak > 0 else cells
    heat = np.asarray(Image.fromarray(norm.astype(np.float32), mode="F").resize((w, h),
                      Image.Resampling.BILINEAR), np.float32).clip(0.0, 1.0)  # fmt: skip
    colour = np.stack([np.ones_like(heat), heat, np.zeros_like(heat)], axis=-1) * 255.0
    alpha = (0.65 * heat)[..., None]
    dimmed = base * (0.45 + 0.55 * heat[..., None])
    img = Image.fromarray((dimmed * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, 8 * len(word) + 8, 16], fill=(0, 0, 0))
    draw.text((4, 2), word, fill=(255, 255, 255))
    return img
