"""Synthetic scenes: coloured shapes on textured backgrounds, sampled and drawn with Pillow.

A scene has 1..``max_objects`` objects. Each object is a shape (its class: circle, square,
triangle, star, ring, cross), with a colour, a size (small / large) and a texture (plain,
striped, dotted) as attributes. Objects may overlap a little (later ones are drawn on top);
placement rejects a new box that overlaps an earlier one by IoU > ``max_iou`` or covers more
than 40 % of it, so every object stays recognisable. Ground-truth boxes are the tight
inclusive pixel bounds of the drawn mask (``x2 - x1 + 1`` pixels wide).

Everything is drawn from a ``numpy.random.Generator``; one seed gives identical scenes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
# Colour name -> RGB centre; drawn colours jitter around it by up to COLOUR_JITTER per channel.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 170, 40),
    "blue": (35, 70, 220),
    "yellow": (235, 215, 25),
    "purple": (140, 40, 175),
    "orange": (245, 130, 15),
}
COLOUR_JITTER = 20
SIZES: tuple[str, ...] = ("small", "large")
# Side of an object's square footprint per size, in pixels (inclusive range).
SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (30, 46), "large": (62, 96)}
TEXTURES: tuple[str, ...] = ("plain", "striped", "dotted")
# Attributes a texture contributes ("plain" contributes none).
TEXTURE_ATTRIBUTES: tuple[str, ...] = ("striped", "dotted")
ATTRIBUTES: tuple[str, ...] = (*COLOURS, *SIZES, *TEXTURE_ATTRIBUTES)


@dataclass(frozen=True)
class SceneParams:
    """What a scene set looks like. Defaults suit the CPU-trainable demo model."""

    # Image side range in pixels (inclusive); width and height are drawn independently.
    min_side: int = 160
    max_side: int = 256
    # Objects per scene (inclusive range).
    min_objects: int = 1
    max_objects: int = 5
    # Placement rejects an overlap above this IoU with any earlier object.
    max_iou: float = 0.2
    # Placement tries before giving up on an object.
    tries: int = 30


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its class, attributes, and tight inclusive box in pixels."""

    shape: str
    colour: str
    size: str
    texture: str
    box: tuple[int, int, int, int]
    rgb: tuple[int, int, int]

    @property
    def attributes(self) -> tuple[str, ...]:
        """Attribute names in a fixed order: colour first, then size, then texture."""
        tex = (self.texture,) if self.texture in TEXTURE_ATTRIBUTES else ()
        return (self.colour, self.size, *tex)

    @property
    def centre_x(self) -> float:
        return (self.box[0] + self.box[2]) / 2.0


@dataclass(frozen=True)
class Scene:
    """A sampled scene: size, background recipe and objects (in drawing order)."""

    image_id: int
    width: int
    height: int
    background: str
    objects: tuple[SceneObject, ...]


def _iou_and_cover(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[float, float]:
    """IoU of inclusive boxes a, b and the fraction of b that a covers."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0, 0.0
    inter = iw * ih
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter), inter / area_b


def _place(
    rng: np.random.Generator,
    side: int,
    w: int,
    h: int,
    taken: list[tuple[int, ...]],
    p: SceneParams,
) -> tuple[int, int, int, int] | None:
    """A free footprint box of ``side`` pixels inside the image, or None."""
    for _ in range(p.tries):
        x1 = int(rng.integers(0, w - side + 1))
        y1 = int(rng.integers(0, h - side + 1))
        box = (x1, y1, x1 + side - 1, y1 + side - 1)
        if all(
            iou <= p.max_iou and cover <= 0.4
            for iou, cover in (_iou_and_cover(box, t) for t in taken)
        ):
            return box
    return None


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    d = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3)
    r, g, b = (int(np.clip(c + x, 0, 255)) for c, x in zip(rgb, d, strict=True))
    return r, g, b


def sample_scene(rng: np.random.Generator, image_id: int, params: SceneParams) -> Scene:
    """Draws the layout of one scene (no pixels yet)."""
    w = int(rng.integers(params.min_side, params.max_side + 1))
    h = int(rng.integers(params.min_side, params.max_side + 1))
    background = str(rng.choice(["gradient", "noise", "stripes", "checker"]))
    n = int(rng.integers(params.min_objects, params.max_objects + 1))
    taken: list[tuple[int, ...]] = []
    objects = []
    for _ in range(n):
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        size, texture = str(rng.choice(SIZES)), str(rng.choice(TEXTURES, p=[0.5, 0.25, 0.25]))
        lo, hi = SIZE_RANGE[size]
        side = min(int(rng.integers(lo, hi + 1)), w, h)
        footprint = _place(rng, side, w, h, taken, params)
        if footprint is None:
            continue
        taken.append(footprint)
        rgb = _jitter(rng, COLOURS[colour])
        objects.append(SceneObject(shape, colour, size, texture, footprint, rgb))
    return Scene(image_id, w, h, background, tuple(objects))


def _star(x1: int, y1: int, side: int) -> list[tuple[float, float]]:
    cx, cy, r_out = x1 + side / 2, y1 + side / 2, side / 2
    pts = []
    for k in range(10):
        r = r_out if k % 2 == 0 else r_out * 0.45
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def shape_mask(shape: str, box: tuple[int, int, int, int], w: int, h: int) -> Image.Image:
    """An 'L' mask (255 inside) of ``shape`` drawn in the footprint ``box``."""
    mask = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mask)
    x1, y1, x2, y2 = box
    side = x2 - x1 + 1
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        m = side // 10
        d.rectangle((x1 + m, y1 + m, x2 - m, y2 - m), fill=255)
    elif shape == "triangle":
        d.polygon([(x1 + side / 2, y1), (x2, y2), (x1, y2)], fill=255)
    elif shape == "star":
        d.polygon(_star(x1, y1, side), fill=255)
    elif shape == "ring":
        d.ellipse(box, outline=255, width=max(3, side // 6))
    elif shape == "cross":
        t = side // 3
        d.rectangle((x1 + t, y1, x2 - t, y2), fill=255)
        d.rectangle((x1, y1 + t, x2, y2 - t), fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return mask


def _background(rng: np.random.Generator, kind: str, w: int, h: int) -> np.ndarray:
    """(h, w, 3) float32 muted background (grey-ish, so object colours stay distinct)."""
    base = rng.uniform(70, 190, size=3) * 0.3 + rng.uniform(70, 190) * 0.7
    other = rng.uniform(70, 190, size=3) * 0.3 + rng.uniform(70, 190) * 0.7
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "gradient":
        t = (xx / w * rng.uniform(-1, 1) + yy / h * rng.uniform(-1, 1)) % 1.0
    elif kind == "stripes":
        period = rng.uniform(6, 20)
        t = (np.sin((xx * rng.uniform(-1, 1) + yy) * 2 * math.pi / period) > 0).astype(np.float32)
    elif kind == "checker":
        c = int(rng.integers(8, 24))
        t = ((xx // c + yy // c) % 2).astype(np.float32)
    else:
        coarse = rng.uniform(0, 1, size=(h // 8 + 2, w // 8 + 2)).astype(np.float32)
        up = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
            (w, h), Image.Resampling.BILINEAR
        )
        t = np.asarray(up, dtype=np.float32) / 255.0
    img = base[None, None, :] * (1 - t[..., None]) + other[None, None, :] * t[..., None]
    noisy: np.ndarray = img + rng.normal(0, 6, size=(h, w, 3))
    return noisy


def _fill(rng: np.random.Generator, obj: SceneObject, w: int, h: int) -> Image.Image:
    """RGB image of the object's colour with its texture (stripes or dots in a darker shade)."""
    fill = Image.new("RGB", (w, h), obj.rgb)
    if obj.texture == "plain":
        return fill
    dark = tuple(int(c * 0.45) for c in obj.rgb)
    d = ImageDraw.Draw(fill)
    x1, y1, x2, y2 = obj.box
    step = max(6, (x2 - x1) // 6)
    if obj.texture == "striped":
        for y in range(y1, y2 + 1, step):
            d.rectangle((x1, y, x2, y + step // 2 - 1), fill=dark)
    else:
        r = max(1, step // 4)
        for y in range(y1 + step // 2, y2, step):
            for x in range(x1 + step // 2, x2, step):
                d.ellipse((x - r, y - r, x + r, y + r), fill=dark)
    return fill


def render_scene(
    rng: np.random.Generator, scene: Scene
) -> tuple[Image.Image, tuple[SceneObject, ...]]:
    """Draws a scene; returns the RGB image and its objects with tight mask boxes."""
    w, h = scene.width, scene.height
    pixels = _background(rng, scene.background, w, h)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    drawn = []
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.box, w, h)
        image.paste(_fill(rng, obj, w, h), (0, 0), mask)
        bbox = mask.getbbox()  # (left, upper, right + 1, lower + 1)
        if bbox is None:
            continue
        tight = (bbox[0], bbox[1], bbox[2] - 1, bbox[3] - 1)
        drawn.append(SceneObject(obj.shape, obj.colour, obj.size, obj.texture, tight, obj.rgb))
    return image, tuple(drawn)
