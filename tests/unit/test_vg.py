"""Visual Genome reader on small hand-written files in the release format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from butd.detector.train.vg import Vocab, load_vg


def _write(root: Path, name: str, data: object) -> None:
    (root / name).write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture
def vg_root(tmp_path: Path) -> Path:
    (tmp_path / "objects_vocab.txt").write_text("dog\nyolk,egg yolk\n\ntree\n", encoding="utf-8")
    (tmp_path / "attributes_vocab.txt").write_text("white\nbrown,tan\nwooden\n", encoding="utf-8")
    (tmp_path / "VG_100K").mkdir()
    (tmp_path / "VG_100K" / "1.jpg").write_bytes(b"")
    _write(
        tmp_path,
        "image_data.json",
        [
            {
                "image_id": 1,
                "width": 100,
                "height": 80,
                "url": "https://cs.stanford.edu/people/rak248/VG_100K/1.jpg",
            },
            {"image_id": 2, "width": 50, "height": 50, "url": "https://x/VG_100K_2/2.jpg"},
            {"image_id": 3, "width": 50, "height": 50, "url": "https://x/VG_100K_2/3.jpg"},
        ],
    )
    _write(
        tmp_path,
        "objects.json",
        [
            {
                "image_id": 1,
                "objects": [
                    {
                        "object_id": 10,
                        "x": 5,
                        "y": 6,
                        "w": 20,
                        "h": 10,
                        "names": [" Dog "],
                        "synsets": ["dog.n.01"],
                    },
                    {
                        "object_id": 11,
                        "x": 90,
                        "y": -3,
                        "w": 30,
                        "h": 40,
                        "names": ["EGG YOLK", "dog"],
                    },
                    {"object_id": 12, "x": 1, "y": 1, "w": 5, "h": 5, "names": ["cat"]},
                    {"object_id": 10, "x": 5, "y": 6, "w": 20, "h": 10, "names": ["dog"]},
                    {"object_id": 13, "x": 120, "y": 1, "w": 5, "h": 5, "names": ["tree"]},
                ],
            },
            {
                "image_id": 2,
                "objects": [
                    {"object_id": 20, "x": 0, "y": 0, "w": 9, "h": 9, "names": ["unicorn"]}
                ],
            },
            {
                "image_id": 3,
                "objects": [{"object_id": 30, "x": 0, "y": 0, "w": 9, "h": 9, "names": ["tree"]}],
            },
        ],
    )
    _write(
        tmp_path,
        "attributes.json",
        [
            {
                "image_id": 1,
                "attributes": [
                    {
                        "object_id": 10,
                        "x": 5,
                        "y": 6,
                        "w": 20,
                        "h": 10,
                        "names": ["dog"],
                        "attributes": ["Tan", "furry", "white ", "brown"],
                    },
                    {"object_id": 11, "x": 90, "y": -3, "w": 30, "h": 40, "names": ["egg yolk"]},
                ],
            },
        ],
    )
    return tmp_path


def test_vocab_synonyms_map_to_one_entry() -> None:
    vocab = Vocab.from_lines(["yolk,egg yolk", " Dog ", "", "tree, trees"])
    assert vocab.names == ("yolk", "dog", "tree")
    assert vocab.lookup("Egg Yolk ") == 0
    assert vocab.lookup("DOG") == 1
    assert vocab.lookup("trees") == 2
    assert vocab.lookup("cat") is None
    assert len(vocab) == 3


def test_load_vg_maps_names_boxes_and_attributes(vg_root: Path) -> None:
    images = load_vg(vg_root)
    # image 2 has no object in the vocabulary and is dropped.
    assert [im.image_id for im in images] == [1, 3]
    im = images[0]
    assert (im.width, im.height) == (100, 80)
    assert im.path == vg_root / "VG_100K" / "1.jpg"
    # dog (id 0-based 0), egg yolk -> yolk (1); cat dropped; repeated object 10 read once;
    # the tree at x=120 lies outside the 100-px-wide image and is dropped by the clip.
    np.testing.assert_array_equal(im.classes, [0, 1])
    # x2 = x + w, clipped to W-1 / H-1; negative y clipped to 0.
    np.testing.assert_allclose(im.boxes, [[5, 6, 25, 16], [90, 0, 99, 37]])
    assert im.boxes.dtype == np.float32
    # "Tan" -> brown (1), "furry" unknown, "white " -> 0, "brown" repeats 1.
    assert im.attributes == ((1, 0), ())


def test_load_vg_keep_empty_and_explicit_vocab(vg_root: Path) -> None:
    vocab = Vocab.from_lines(["unicorn"])
    images = load_vg(vg_root, objects_vocab=vocab, keep_empty=True)
    assert [len(im.classes) for im in images] == [0, 1, 0]
    assert images[1].classes.tolist() == [0]
    assert images[1].boxes.shape == (1, 4)
    assert images[0].boxes.shape == (0, 4)
