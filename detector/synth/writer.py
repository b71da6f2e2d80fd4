"""Writes a synthetic scene set in the Visual Genome layout, plus captions and VQA files.

Output directory::

    images/000001.jpg ...            the scenes (JPEG, quality 95)
    image_data.json                  [{image_id, width, height, url: "images/000001.jpg", ...}]
    objects.json       [{image_id, objects: [{object_id, x, y, w, h, names, synsets}]}]
    attributes.json    [{image_id, attributes: [{object_id, ..., attributes: [...]}]}]
    objects_vocab.txt                one shape per line
    attributes_vocab.txt             one attribute per line (colours, sizes, textures)
    captions.json                    COCO captions: images, annotations (5 per image)
    vqa_questions.json               VQA v2 questions
    vqa_annotations.json             VQA v2 annotations (10 answers each)

Boxes follow the Visual Genome convention the reader (``butd.detector.train.vg``) inverts:
``x2 = x + w`` with inclusive pixel bounds.

Image ``i`` (1-based id) is drawn from ``numpy.random.default_rng([seed, i])``, so a set of
N images is a prefix of a set of N + M images with the same seed, and files are byte-identical
across runs with the same seed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from butd.detector.synth.language import captions, questions
from butd.detector.synth.scenes import ATTRIBUTES, SHAPES, SceneObject, SceneParams, render_scene
from butd.detector.synth.scenes import sample_scene as _sample

logger = logging.getLogger(__name__)

JPEG_QUALITY = 95
INFO = {
    "description": "butd synthetic scenes: coloured shapes on textured backgrounds",
    "version": "1",
    "contributor": "butd butd.detector.synth",
}


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_synthetic_set`` wrote."""

    out: Path
    images: int
    objects: int
    captions: int
    questions: int


def _object_entry(image_id: int, j: int, obj: SceneObject) -> dict[str, Any]:
    x1, y1, x2, y2 = obj.box
    return {
        "object_id": image_id * 100 + j,
        "x": x1,
        "y": y1,
        "w": x2 - x1,
        "h": y2 - y1,
        "names": [obj.shape],
        "synsets": [],
    }


def _jpeg(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


class _Collector:
    """Accumulates the JSON documents while images are written."""

    def __init__(self) -> None:
        self.image_data: list[dict[str, Any]] = []
        self.objects: list[dict[str, Any]] = []
        self.attributes: list[dict[str, Any]] = []
        self.coco_images: list[dict[str, Any]] = []
        self.captions: list[dict[str, Any]] = []
        self.questions: list[dict[str, Any]] = []
        self.answers: list[dict[str, Any]] = []

    def add(
        self,
        rng: np.random.Generator,
        image_id: int,
        size: tuple[int, int],
        objects: tuple[SceneObject, ...],
    ) -> None:
        """Ground truth and language of one scene (``rng`` continues the scene's stream)."""
        w, h = size
        name = f"images/{image_id:06d}.jpg"
        self.image_data.append(
            {
                "image_id": image_id,
                "width": w,
                "height": h,
                "url": name,
                "coco_id": None,
                "flickr_id": None,
            }
        )
        entries = [_object_entry(image_id, j, o) for j, o in enumerate(objects)]
        self.objects.append({"image_id": image_id, "objects": entries})
        self.attributes.append(
            {
                "image_id": image_id,
                "attributes": [
                    {**e, "attributes": list(o.attributes)}
                    for e, o in zip(entries, objects, strict=True)
                ],
            }
        )
        self.coco_images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        self._add_language(rng, image_id, objects)

    def _add_language(
        self, rng: np.random.Generator, image_id: int, objects: tuple[SceneObject, ...]
    ) -> None:
        """Captions, then questions with their annotations (rng draws in that order)."""
        for text in captions(rng, objects):
            self.captions.append(
                {"id": len(self.captions) + 1, "image_id": image_id, "caption": text}
            )
        for k, q in enumerate(questions(rng, objects)):
            qid = image_id * 1000 + k
            self.questions.append(
                {"image_id": image_id, "question": q.question, "question_id": qid}
            )
            self.answers.append(
                {
                    "question_id": qid,
                    "image_id": image_id,
                    "question_type": q.question_type,
                    "answer_type": q.answer_type,
                    "multiple_choice_answer": q.answer,
                    "answers": [
                        {"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                        for i, a in enumerate(q.answers)
                    ],
                }
            )

    def documents(self) -> dict[str, Any]:
        vqa_head = {"info": INFO, "license": {"name": "CC0"}, "data_subtype": "synthetic"}
        return {
            "image_data.json": self.image_data,
            "objects.json": self.objects,
            "attributes.json": self.attributes,
            "captions.json": {
                "info": INFO,
                "licenses": [],
                "images": self.coco_images,
                "annotations": self.captions,
            },
            "vqa_questions.json": {
                **vqa_head,
                "task_type": "Open-Ended",
                "data_type": "synthetic",
                "questions": self.questions,
            },
            "vqa_annotations.json": {**vqa_head, "annotations": self.answers},
        }


def write_synthetic_set(
    out: str | Path,
    num_images: int,
    seed: int,
    params: SceneParams | None = None,
    *,
    progress: bool = False,
) -> SynthSummary:
    """Renders ``num_images`` scenes into ``out`` (created if missing) in the VG layout.

    Args:
        out: output directory.
        num_images: number of scenes; ids run 1..num_images.
        seed: base seed; scene ``i`` uses ``default_rng([seed, i])``.
        params: scene parameters (``SceneParams()`` by default).
        progress: show a tqdm progress bar.

    Returns:
        Counts of what was written.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}")
    params = params or SceneParams()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    docs = _Collector()
    for image_id in tqdm(range(1, num_images + 1), disable=not progress, desc="synth"):
        rng = np.random.default_rng([seed, image_id])
        scene = _sample(rng, image_id, params)
        image, objects = render_scene(rng, scene)
        (out / f"images/{image_id:06d}.jpg").write_bytes(_jpeg(image))
        docs.add(rng, image_id, (scene.width, scene.height), objects)
    for name, doc in docs.documents().items():
        (out / name).write_text(json.dumps(doc, indent=None, sort_keys=True), encoding="utf-8")
    (out / "objects_vocab.txt").write_text("\n".join(SHAPES) + "\n", encoding="utf-8")
    (out / "attributes_vocab.txt").write_text("\n".join(ATTRIBUTES) + "\n", encoding="utf-8")
    summary = SynthSummary(
        out,
        num_images,
        sum(len(o["objects"]) for o in docs.objects),
        len(docs.captions),
        len(docs.questions),
    )
    logger.info("wrote %s", summary)
    return summary
