"""The packaged demo heads (heads/demo): they load, read the demo detector's features of a
synthetic scene it never saw, answer in their vocabularies, and say they are the synthetic
demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from butd.heads.demo import DEMO_NOTE, demo_head
from butd.heads.inference import answer, caption, load_head
from butd.heads.synth import COLORS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, dict[str, object]]:
    """A held-out scene (seed 99, not the training seed 3) and the demo detector's record."""
    from butd.detector.extractor import Extractor
    from butd.detector.synth import write_synthetic_set
    from butd.images import decode_image

    root = tmp_path_factory.mktemp("scene")
    write_synthetic_set(root, 1, seed=99)
    image = root / "images" / "000001.jpg"
    extractor = Extractor.from_weights(None)
    record = extractor.extract([decode_image(image.read_bytes())], ["000001.jpg"])[0]
    questions = json.loads((root / "vqa_questions.json").read_text())["questions"]
    return record, questions[0], image


def test_demo_heads_are_packaged_and_marked() -> None:
    for task in ("caption", "vqa"):
        path = demo_head(task) / "last.pt"
        assert path.is_file() and path.stat().st_size < 4 * 2**20
        _, meta = load_head(demo_head(task))
        assert meta["task"] == task and meta["note"] == DEMO_NOTE
        assert meta["config"]["feature_dim"] == 256  # the demo detector's D


def test_demo_caption_and_answer_on_an_unseen_scene(scene) -> None:
    record, question, _ = scene
    model, meta = load_head(demo_head("caption"))
    cap = caption(model, meta, record, beam_size=3, max_len=16)
    assert cap.words and set(cap.words) <= set(meta["vocab"])
    assert cap.attention.shape == (len(cap.words), record.num_boxes)
    assert any(w in COLORS for w in cap.words)  # it names a colour, as every synth caption does
    model, meta = load_head(demo_head("vqa"))
    got = answer(model, meta, record, question["question"], top=3)
    assert len(got.answers) == 3 and all(a in meta["answers"] for a, _ in got.answers)
    assert got.attention.shape[-1] == record.num_boxes


def test_show_attention_uses_the_demo_captioner_by_default(scene, tmp_path: Path, capsys) -> None:
    from butd.cli.main import main

    _, _, image = scene
    out = tmp_path / "attention.png"
    assert main(["show", str(image), "--attention", "--beam-size", "2", "--out", str(out)]) == 0
    words = capsys.readouterr().out.split(": ", 1)[1]
    assert out.stat().st_size > 0 and "panels" in words
