"""Synthetic scene sets: determinism, VG-layout round trip, captions and VQA files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from butd.detector.synth import ATTRIBUTES, SHAPES, write_synthetic_set
from butd.detector.synth.scenes import COLOURS
from butd.detector.train.vg import load_vg


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a, b, c = (
        write_synthetic_set(tmp_path / n, 6, s).out for n, s in (("a", 3), ("b", 3), ("c", 4))
    )
    da, db, dc = _digest(a), _digest(b), _digest(c)
    assert da == db
    assert len(da) == 6 + 8  # 6 images + 6 JSON files + 2 vocab files
    assert da["images/000001.jpg"] != dc["images/000001.jpg"]
    assert da["objects.json"] != dc["objects.json"]
    # Image i does not depend on how many images follow it.
    d = write_synthetic_set(tmp_path / "d", 3, 3).out
    assert _digest(d)["images/000002.jpg"] == da["images/000002.jpg"]


def test_round_trip_through_vg_reader(tmp_path: Path) -> None:
    summary = write_synthetic_set(tmp_path, 8, 7)
    images = load_vg(tmp_path)
    assert len(images) == 8
    assert sum(len(im.classes) for im in images) == summary.objects
    for im in images:
        pixels = np.asarray(Image.open(im.path).convert("RGB"))
        assert pixels.shape == (im.height, im.width, 3)
        assert ((im.boxes[:, 2:] >= im.boxes[:, :2]).all()) and im.boxes.min() >= 0
        assert (im.boxes[:, 2] <= im.width - 1).all() and (im.boxes[:, 3] <= im.height - 1).all()
        for cls, attrs, box in zip(im.classes, im.attributes, im.boxes, strict=True):
            assert 0 <= cls < len(SHAPES)
            # colour first, then size; the object's colour is visible inside its box.
            assert ATTRIBUTES[attrs[0]] in COLOURS and ATTRIBUTES[attrs[1]] in ("small", "large")
            x1, y1, x2, y2 = box.astype(int)
            patch = pixels[y1 : y2 + 1, x1 : x2 + 1].reshape(-1, 3).astype(float)
            target = np.array(COLOURS[ATTRIBUTES[attrs[0]]], dtype=float)
            assert np.linalg.norm(patch - target, axis=1).min() < 40


def test_captions_and_vqa_follow_the_scene(tmp_path: Path) -> None:
    write_synthetic_set(tmp_path, 10, 5)
    objects = {
        o["image_id"]: o["objects"] for o in json.loads((tmp_path / "objects.json").read_text())
    }
    attrs = {
        a["image_id"]: a["attributes"]
        for a in json.loads((tmp_path / "attributes.json").read_text())
    }
    caps = json.loads((tmp_path / "captions.json").read_text())
    assert len(caps["images"]) == 10 and len(caps["annotations"]) == 50
    for ann in caps["annotations"]:
        pairs = {f"{a['attributes'][0]} {a['names'][0]}" for a in attrs[ann["image_id"]]}
        assert all(p in ann["caption"] for p in pairs)
    qs = json.loads((tmp_path / "vqa_questions.json").read_text())["questions"]
    anns = json.loads((tmp_path / "vqa_annotations.json").read_text())["annotations"]
    assert [q["question_id"] for q in qs] == [a["question_id"] for a in anns]
    for q, a in zip(qs, anns, strict=True):
        assert len(a["answers"]) == 10
        shapes = [o["names"][0] for o in objects[q["image_id"]]]
        if q["question"].startswith("how many "):
            asked = next(s for s in SHAPES if q["question"].startswith(f"how many {s}"))
            assert a["multiple_choice_answer"] == str(shapes.count(asked))
            assert a["answer_type"] == "number"
        if q["question"].startswith("what color is the "):
            asked = q["question"][len("what color is the ") : -1]
            colour = [x["attributes"][0] for x in attrs[q["image_id"]] if x["names"][0] == asked]
            assert [a["multiple_choice_answer"]] == colour
    types = {a["question_type"] for a in anns}
    assert {"what color is the", "how many", "is there a"} <= types


def test_butd_synth_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from butd.cli import train as cli

    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(
        ["synth", "--out", str(tmp_path / "cli"), "--images", "2", "--seed", "3", "--no-progress"]
    )
    assert args.handler(args) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert _digest(tmp_path / "cli") == _digest(write_synthetic_set(tmp_path / "lib", 2, 3).out)
