"""Captions and question/answer pairs for synthetic scenes (heads-reference §10.1).

Captions: 5 per scene, every object listed as "(size) colour shape" in a random order, under
templates "a ...", "there is ...", "an image of ...". Questions, each with 10 noisy "human"
answers (90 % agreement):

=============  ======================================  ==============  ============
type           template                                answer_type     needs
=============  ======================================  ==============  ============
color          what color is the {shape}?              other           binding
count          how many {shape}s are there?            number          counting
exist          is there a {color} {shape}?  (50/50)    yes/no          conjunction
relation       what is left of the {shape}?            other           space
=============  ======================================  ==============  ============

"the {shape}" templates are asked only about shapes that occur once in the scene; "left of" names
the object whose centre is nearest to the left of the referenced one.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from butd.detector.synth.scenes import COLOURS, SHAPES, SceneObject

CAPTIONS_PER_IMAGE = 5
ANSWERS_PER_QUESTION = 10
# Probability that one simulated annotator gives the true answer.
ANSWER_AGREEMENT = 0.9
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {}",
    "there is a {}",
    "an image of a {}",
    "a picture showing a {}",
    "a {} on a textured background",
)


@dataclass(frozen=True)
class Question:
    """A templated question with its true answer and 10 simulated human answers."""

    question: str
    question_type: str
    answer_type: str
    answer: str
    answers: tuple[str, ...]


def plural(shape: str) -> str:
    """English plural of a shape name (cross -> crosses)."""
    return shape + ("es" if shape.endswith(("s", "x", "sh", "ch")) else "s")


def _phrase(obj: SceneObject, with_size: bool) -> str:
    return f"{obj.size} {obj.colour} {obj.shape}" if with_size else f"{obj.colour} {obj.shape}"


def _join(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", a ".join(phrases[:-1]) + " and a " + phrases[-1]


def captions(rng: np.random.Generator, objects: tuple[SceneObject, ...]) -> list[str]:
    """``CAPTIONS_PER_IMAGE`` captions, each listing every object once in a random order."""
    out = []
    for k in range(CAPTIONS_PER_IMAGE):
        order = rng.permutation(len(objects))
        with_size = bool(rng.integers(0, 2))
        phrases = [_phrase(objects[i], with_size) for i in order]
        out.append(CAPTION_TEMPLATES[k % len(CAPTION_TEMPLATES)].format(_join(phrases)))
    return out


def _noisy_answers(rng: np.random.Generator, answer: str, choices: list[str]) -> tuple[str, ...]:
    others = [c for c in choices if c != answer] or [answer]
    return tuple(
        answer if rng.random() < ANSWER_AGREEMENT else str(rng.choice(others))
        for _ in range(ANSWERS_PER_QUESTION)
    )


def _question(
    rng: np.random.Generator, text: str, qtype: str, atype: str, answer: str, choices: list[str]
) -> Question:
    return Question(text, qtype, atype, answer, _noisy_answers(rng, answer, choices))


def _left_of(objects: tuple[SceneObject, ...], ref: SceneObject) -> SceneObject | None:
    left = [o for o in objects if o.centre_x < ref.centre_x - 1.0]
    return max(left, key=lambda o: o.centre_x) if left else None


def questions(rng: np.random.Generator, objects: tuple[SceneObject, ...]) -> list[Question]:
    """Color, count, exist and relation questions about one scene."""
    counts = Counter(o.shape for o in objects)
    colours, shapes = list(COLOURS), list(SHAPES)
    numbers = [str(i) for i in range(7)]
    out = []
    unique = [o for o in objects if counts[o.shape] == 1]
    for obj in unique:
        text = f"what color is the {obj.shape}?"
        out.append(_question(rng, text, "what color is the", "other", obj.colour, colours))
    shape = str(rng.choice(shapes))
    text = f"how many {plural(shape)} are there?"
    out.append(_question(rng, text, "how many", "number", str(counts[shape]), numbers))
    present = {(o.colour, o.shape) for o in objects}
    if rng.random() < 0.5 and objects:
        colour, shape = sorted(present)[int(rng.integers(0, len(present)))]
    else:
        colour, shape = str(rng.choice(colours)), str(rng.choice(shapes))
    answer = "yes" if (colour, shape) in present else "no"
    text = f"is there a {colour} {shape}?"
    out.append(_question(rng, text, "is there a", "yes/no", answer, ["yes", "no"]))
    for obj in unique:
        other = _left_of(objects, obj)
        if other is not None:
            text = f"what is left of the {obj.shape}?"
            out.append(_question(rng, text, "what is", "other", other.shape, shapes))
    return out
