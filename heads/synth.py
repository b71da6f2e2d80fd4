"""Simulated region features for the learning benchmark (heads-reference §10.1).

Scenes of coloured shapes are "detected" straight into the stored record format
(``FeatureRecord``, float16 features): each object's region feature is
``relu(E_color[c] + E_shape[s] + E_size[z] + N(0, σ²))`` with fixed random Gaussian codebooks,
so colour and shape are superimposed inside one vector and mean pooling keeps which colours and
which shapes occur but not which belongs to which (the binding problem). With p = 0.3 an object
gets a jittered duplicate detection (feature × 0.8), clutter regions from 8 "stuff" codes fill
each image to K ∈ [10, 16], and the region order is shuffled.

Each record's ``extra["object"]`` gives, per region, the index of the scene object it shows
(-1 for clutter); it is used only to score where the attention lands.

Grid scenes (``SynthWorld.grid_scene``, ``make_scenes(grid=True)``) render the same world as the
detector's grid features would show it: a GRID x GRID map (the 4 x 4 layout the objects are
placed on) whose cell holding an object is ``relu(object code + 0.5 stuff code + noise)`` (the
background leaks into the cell) and every other cell ``relu(stuff code + noise)``. The record
carries the map as ``grid`` (G, G, D) and, so that every head and diagnostic reads it unchanged,
also as its G*G "regions" in row-major order (boxes = the cells, not shuffled: CBAM's
convolution reads the layout).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from butd.store.records import FeatureRecord

COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
NUM_STUFF = 8
IMAGE_W, IMAGE_H, GRID = 640, 480, 4


@dataclass(frozen=True)
class SceneObject:
    """One object: colour, shape and size indices and its box (x1, y1, x2, y2 pixels)."""

    color: int
    shape: int
    size: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Scene:
    """A scene's objects and its simulated detections."""

    objects: tuple[SceneObject, ...]
    record: FeatureRecord


@dataclass(frozen=True)
class Question:
    """A templated question with 10 noisy human answers."""

    scene: int
    qtype: str  # color | shape | count | exist
    text: str
    answer: str
    human_answers: tuple[str, ...]
    target_object: int  # object the question is about (-1 for count)


class SynthWorld:
    """Codebooks and samplers of the simulated world."""

    def __init__(self, dim: int = 2048, seed: int = 0, noise: float = 0.3) -> None:
        g = np.random.default_rng(seed)
        self.dim, self.noise = dim, noise
        self.color_codes = g.standard_normal((len(COLORS), dim)).astype(np.float32)
        self.shape_codes = g.standard_normal((len(SHAPES), dim)).astype(np.float32)
        self.size_codes = g.standard_normal((len(SIZES), dim)).astype(np.float32) * 0.5
        self.stuff_codes = g.standard_normal((NUM_STUFF, dim)).astype(np.float32)

    def _feature(self, code: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.maximum(code + rng.normal(0.0, self.noise, self.dim), 0.0)

    def scene(
        self, image_id: str, rng: np.random.Generator, min_objects: int = 1, max_objects: int = 6
    ) -> Scene:
        """One random scene and its detections."""
        n = int(rng.integers(min_objects, max_objects + 1))
        cells = rng.choice(GRID * GRID, size=n, replace=False)
        objects = tuple(_object(int(c), rng) for c in cells)
        feats: list[np.ndarray] = []
        boxes: list[tuple[float, ...]] = []
        owner: list[int] = []
        for i, o in enumerate(objects):
            code = self.color_codes[o.color] + self.shape_codes[o.shape] + self.size_codes[o.size]
            feats.append(self._feature(code, rng))
            boxes.append(o.box)
            owner.append(i)
            if rng.random() < 0.3:  # a jittered duplicate detection
                feats.append(self._feature(code, rng) * 0.8)
                boxes.append(_jitter(o.box, rng))
                owner.append(i)
        k = max(int(rng.integers(10, 17)), len(feats))
        while len(feats) < k:
            feats.append(self._feature(self.stuff_codes[rng.integers(NUM_STUFF)], rng))
            boxes.append(_random_box(rng))
            owner.append(-1)
        order = rng.permutation(len(feats))
        return Scene(objects, _record(image_id, feats, boxes, owner, objects, order))


def grid_scene(
    world: SynthWorld,
    image_id: str,
    rng: np.random.Generator,
    min_objects: int = 1,
    max_objects: int = 6,
) -> Scene:
    """One random scene rendered as a GRID x GRID map of cell features."""
    n = int(rng.integers(min_objects, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = tuple(_object(int(c), rng) for c in cells)
    owner = np.full(GRID * GRID, -1)
    owner[cells] = np.arange(n)
    feats = []
    for cell in range(GRID * GRID):
        code = world.stuff_codes[rng.integers(NUM_STUFF)]
        if owner[cell] >= 0:
            o = objects[owner[cell]]
            code = world.color_codes[o.color] + world.shape_codes[o.shape] + world.size_codes[
                o.size] + 0.5 * code  # fmt: skip
        feats.append(world._feature(code, rng))
    cw, ch = IMAGE_W / GRID, IMAGE_H / GRID
    boxes = [((c % GRID) * cw, (c // GRID) * ch, (c % GRID + 1) * cw, (c // GRID + 1) * ch)
             for c in range(GRID * GRID)]  # fmt: skip
    rec = _record(image_id, feats, boxes, owner.tolist(), objects, np.arange(GRID * GRID))
    grid = rec.features.reshape(GRID, GRID, world.dim)
    return Scene(objects, replace(rec, grid=grid))


def _object(cell: int, rng: np.random.Generator) -> SceneObject:
    cw, ch = IMAGE_W / GRID, IMAGE_H / GRID
    size = int(rng.integers(len(SIZES)))
    frac = 0.45 if size == 0 else 0.85
    x0, y0 = (cell % GRID) * cw, (cell // GRID) * ch
    w, h = cw * frac, ch * frac
    x1, y1 = x0 + rng.random() * (cw - w), y0 + rng.random() * (ch - h)
    color, shape = int(rng.integers(len(COLORS))), int(rng.integers(len(SHAPES)))
    return SceneObject(color, shape, size, (x1, y1, x1 + w, y1 + h))


def _jitter(box: tuple[float, ...], rng: np.random.Generator) -> tuple[float, ...]:
    w, h = box[2] - box[0], box[3] - box[1]
    dx, dy = rng.normal(0, 0.08 * w), rng.normal(0, 0.08 * h)
    return (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)


def _random_box(rng: np.random.Generator) -> tuple[float, ...]:
    x1, y1 = rng.random() * IMAGE_W * 0.8, rng.random() * IMAGE_H * 0.8
    return (
        x1,
        y1,
        min(x1 + 40 + rng.random() * 200, IMAGE_W),
        min(y1 + 40 + rng.random() * 150, IMAGE_H),
    )


def _record(
    image_id: str,
    feats: list[np.ndarray],
    boxes: list[tuple[float, ...]],
    owner: list[int],
    objects: Sequence[SceneObject],
    order: np.ndarray,
) -> FeatureRecord:
    n = len(order)
    owner_arr = np.asarray(owner)[order]
    obj_id = np.array([objects[o].shape if o >= 0 else len(SHAPES) for o in owner_arr], np.int64)
    attr_id = np.array([objects[o].color if o >= 0 else 0 for o in owner_arr], np.int64)
    return FeatureRecord(
        image_id=image_id,
        image_w=IMAGE_W,
        image_h=IMAGE_H,
        boxes=np.clip(np.asarray(boxes, np.float32)[order], 0, [IMAGE_W, IMAGE_H] * 2).astype(
            np.float32
        ),
        features=np.asarray(feats, np.float32)[order].astype(np.float16),
        objects_id=obj_id,
        objects_conf=np.ones(n, np.float32),
        attrs_id=attr_id,
        attrs_conf=np.ones(n, np.float32),
        model_version="synthetic",
        extra={"object": owner_arr.tolist()},
    )


def make_scenes(
    world: SynthWorld,
    n: int,
    seed: int,
    min_objects: int = 1,
    max_objects: int = 6,
    grid: bool = False,
) -> list[Scene]:
    """``n`` scenes with ids ``synth-<seed>-<i>``; ``grid`` renders them as grid maps."""
    rng = np.random.default_rng(seed)
    if grid:
        return [
            grid_scene(world, f"synth-{seed}-{i}", rng, min_objects, max_objects) for i in range(n)
        ]
    return [world.scene(f"synth-{seed}-{i}", rng, min_objects, max_objects) for i in range(n)]


# ----------------------------------------------------------------------------------- questions
def _humans(answer: str, pool: Sequence[str], rng: random.Random) -> tuple[str, ...]:
    """10 answers, each the right one with p = 0.9, else a random one of the same type."""
    return tuple(answer if rng.random() < 0.9 else rng.choice(pool) for _ in range(10))


def scene_questions(index: int, scene: Scene, rng: random.Random) -> list[Question]:
    """Colour, shape, count and exist questions of one scene (heads-reference §10.1 table)."""
    objs, out = scene.objects, []
    shape_n = Counter(o.shape for o in objs)
    color_n = Counter(o.color for o in objs)
    counts = [str(i) for i in range(7)]
    for i, o in enumerate(objs):
        if shape_n[o.shape] == 1:
            text = f"what color is the {SHAPES[o.shape]}?"
            out.append(
                Question(
                    index, "color", text, COLORS[o.color], _humans(COLORS[o.color], COLORS, rng), i
                )
            )
        if color_n[o.color] == 1:
            text = f"what shape is the {COLORS[o.color]} thing?"
            out.append(
                Question(
                    index, "shape", text, SHAPES[o.shape], _humans(SHAPES[o.shape], SHAPES, rng), i
                )
            )
    c = rng.randrange(len(COLORS))
    n = str(color_n[c])
    out.append(
        Question(
            index,
            "count",
            f"how many {COLORS[c]} things are there?",
            n,
            _humans(n, counts, rng),
            -1,
        )
    )
    out.append(_exist_question(index, objs, rng))
    return out


def _exist_question(index: int, objs: Sequence[SceneObject], rng: random.Random) -> Question:
    pairs = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        i = rng.randrange(len(objs))
        color, shape, answer, target = objs[i].color, objs[i].shape, "yes", i
    else:  # a hard "no": colour and shape both present but never together, when possible
        colors, shapes = sorted({o.color for o in objs}), sorted({o.shape for o in objs})
        cands = [(c, s) for c in colors for s in shapes if (c, s) not in pairs]
        if not cands:
            cands = [
                (c, s)
                for c in range(len(COLORS))
                for s in range(len(SHAPES))
                if (c, s) not in pairs
            ]
        color, shape = rng.choice(cands)
        answer, target = "no", -1
    text = f"is there a {COLORS[color]} {SHAPES[shape]}?"
    return Question(index, "exist", text, answer, _humans(answer, ("yes", "no"), rng), target)


def make_questions(scenes: Sequence[Scene], seed: int) -> list[Question]:
    """All questions of all scenes."""
    rng = random.Random(seed)
    return [q for i, s in enumerate(scenes) for q in scene_questions(i, s, rng)]


# ------------------------------------------------------------------------------------ captions
def scene_captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """``n`` reference captions listing every object in random order."""
    caps = []
    for _ in range(n):
        objs = list(scene.objects)
        rng.shuffle(objs)
        phrases = [_phrase(o, rng) for o in objs]
        body = phrases[0] if len(phrases) == 1 else " , ".join(phrases[:-1]) + " and " + phrases[-1]
        caps.append(rng.choice(("", "there is ", "an image of ")) + body)
    return caps


def _phrase(o: SceneObject, rng: random.Random) -> str:
    size = f"{SIZES[o.size]} " if rng.random() < 0.5 else ""
    return f"a {size}{COLORS[o.color]} {SHAPES[o.shape]}"


def parse_pairs(tokens: Sequence[str]) -> Counter[tuple[str, str]]:
    """(colour, shape) pairs: a colour word, an optional size word, then a shape word."""
    pairs: Counter[tuple[str, str]] = Counter()
    for i, t in enumerate(tokens):
        if t not in COLORS:
            continue
        j = i + 1
        if j < len(tokens) and tokens[j] in SIZES:
            j += 1
        if j < len(tokens) and tokens[j] in SHAPES:
            pairs[(t, tokens[j])] += 1
    return pairs


def scene_pairs(scene: Scene) -> Counter[tuple[str, str]]:
    """The true multiset of (colour, shape) pairs."""
    return Counter((COLORS[o.color], SHAPES[o.shape]) for o in scene.objects)


def content_f1(pred: Counter[tuple[str, str]], truth: Counter[tuple[str, str]]) -> float:
    """Multiset F1 of predicted vs true pairs."""
    hit = sum((pred & truth).values())
    total = sum(pred.values()) + sum(truth.values())
    return 2.0 * hit / total if total else 1.0


def unbound_oracle(scenes: Sequence[Scene], seed: int = 0) -> tuple[float, float]:
    """Mean content-F1 and exact-set rate of the true colours and shapes paired at random."""
    rng = random.Random(seed)
    f1s, exact = [], []
    for s in scenes:
        colors = [COLORS[o.color] for o in s.objects]
        shapes = [SHAPES[o.shape] for o in s.objects]
        rng.shuffle(shapes)
        pred = Counter(zip(colors, shapes, strict=True))
        f1s.append(content_f1(pred, scene_pairs(s)))
        exact.append(float(pred == scene_pairs(s)))
    return 100 * float(np.mean(f1s)), 100 * float(np.mean(exact))
