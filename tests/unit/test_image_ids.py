"""The image-id rule from ``butd extract`` to exports and heads: COCO-named and synth-named
files, COCO / VQA / synth annotations keyed by integers."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from butd.cli.main import main
from butd.store.h5 import FeatureFile
from butd.store.h5_writer import write_feature_file
from butd.store.image_ids import IdPolicy, ImageIdError, coco_parts, consumer_keys, join_ids
from butd.store.readers import read_lxmert_tsv, read_tsv
from tests.heads_data import run_heads_cli
from tests.tiny_weights import make_tiny_weights
from tests.unit.test_h5 import make_records, meta


def test_rules_name_files() -> None:
    rel = "val2014/COCO_val2014_000000000042.jpg"
    assert IdPolicy("path").image_id(rel) == rel
    assert IdPolicy("stem").image_id(rel) == "COCO_val2014_000000000042"
    assert IdPolicy("coco").image_id(rel) == "42"
    assert IdPolicy("coco").image_id("000001.jpg") == "1"
    assert coco_parts("COCO_test2015_000000000007.png") == ("test2015", 7)
    assert coco_parts("dog.jpg") is None and coco_parts("COCO_val2014_x.jpg") is None
    with pytest.raises(ImageIdError, match=r"'photos/dog\.jpg' is neither COCO"):
        IdPolicy("coco").image_id("photos/dog.jpg")
    mapped = IdPolicy("map", {"a/dog.jpg": "7", "cat.jpg": "8"}, "m.json")
    assert mapped.image_id("a/dog.jpg") == "7" and mapped.image_id("b/cat.jpg") == "8"
    with pytest.raises(ImageIdError, match=r"m\.json has no id for 'x\.jpg'"):
        mapped.image_id("x.jpg")
    meta_ = IdPolicy("coco").metadata(["COCO_val2014_000000000042.jpg", "000001.jpg"])
    assert meta_ == {"rule": "coco", "coco_splits": ["val2014"]}


def test_consumer_keys_per_style() -> None:
    coco = {"rule": "coco", "coco_splits": ["val2014"]}
    assert consumer_keys(["42", "7"], "int", coco, "tsv") == [42, 7]
    assert consumer_keys(["42"], "stem", coco, "lxmert") == ["COCO_val2014_000000000042"]
    path = {"rule": "path"}
    ids = ["val2014/COCO_val2014_000000000042.jpg"]
    assert consumer_keys(ids, "int", path, "tsv") == [42]
    assert consumer_keys(ids, "stem", path, "lxmert") == ["COCO_val2014_000000000042"]
    with pytest.raises(ImageIdError, match="several splits"):
        consumer_keys(["42"], "stem", {"rule": "coco", "coco_splits": ["a1", "b2"]}, "lxmert")
    with pytest.raises(ImageIdError, match=r"'a/1\.jpg' and 'b/1\.jpg'.*both become the key 1"):
        consumer_keys(["a/1.jpg", "b/1.jpg"], "int", path, "tsv")


def test_join_finds_each_id_style() -> None:
    stored = ["val2014/COCO_val2014_000000000042.jpg", "000001.jpg", "dog.jpg"]
    joined = join_ids(["42", "1", "dog", "COCO_val2014_000000000042", "99"], stored, "path")
    assert joined.matched == {
        "42": stored[0], "1": stored[1], "dog": stored[2], "COCO_val2014_000000000042": stored[0]
    }  # fmt: skip
    assert joined.missing == ["99"]
    text = joined.summary("f.h5")
    assert text.startswith("4 of 5 annotated images have features in f.h5")
    assert "'42'" in text and repr(stored[0]) in text and "'99'" in text
    ambiguous = join_ids(["1"], ["a/1.jpg", "b/1.jpg"])
    assert ambiguous.matched == {}  # two stored images are "1": no guess


def _png(path: Path, seed: int) -> None:
    rgb = np.random.default_rng(seed).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    path.write_bytes(buf.getvalue())


def test_extract_coco_rule_then_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    weights = make_tiny_weights(tmp_path / "tiny.safetensors")
    images = tmp_path / "val2014"
    images.mkdir()
    for i, n in enumerate((42, 73)):
        _png(images / f"COCO_val2014_{n:012d}.png", i)
    out = tmp_path / "f.h5"
    base = ["extract", str(images), "--out", str(out), "--weights", str(weights)]
    assert main([*base, "--image-ids", "coco"]) == 0
    with FeatureFile(out) as ff:
        assert sorted(ff.ids()) == ["42", "73"]
        assert ff.id_policy == {"rule": "coco", "coco_splits": ["val2014"]}
    assert (
        main(["export", str(out), "--format", "lxmert-tsv", "--out", str(tmp_path / "l.tsv")]) == 0
    )
    got = sorted(r.image_id for r in read_lxmert_tsv(tmp_path / "l.tsv"))
    assert got == ["COCO_val2014_000000000042", "COCO_val2014_000000000073"]
    assert main(["export", str(out), "--format", "tsv", "--out", str(tmp_path / "t.tsv")]) == 0
    assert sorted(r["image_id"] for r in read_tsv(tmp_path / "t.tsv")) == ["42", "73"]
    capsys.readouterr()
    assert main([*base, "--image-ids", "stem"]) == 2  # a resume must keep the rule
    assert "made with --image-ids coco" in capsys.readouterr().err
    _png(images / "dog.png", 5)
    assert main([*base, "--image-ids", "coco"]) == 2
    assert "1 of 3 images have no id: image id rule coco: 'dog.png'" in capsys.readouterr().err


def test_export_refusal_names_rule_id_and_fix(tmp_path: Path, capsys) -> None:
    recs = [
        replace(r, image_id=f"photos/{n}.jpg") for r, n in zip(make_records(2), "ab", strict=True)
    ]
    src = tmp_path / "f.h5"
    write_feature_file(src, recs, **meta(id_policy={"rule": "path"}))
    assert main(["export", str(src), "--format", "h5-ragged", "--out", str(tmp_path / "r.h5")]) == 2
    err = capsys.readouterr().err
    assert "'photos/a.jpg' (rule path)" in err and "--image-ids coco" in err
    assert "int(image_id)" in err and not (tmp_path / "r.h5").exists()


def _heads_files(root: Path, ids: list[str], annotation_ids: list[int]) -> Path:
    """A feature file under ``ids`` and COCO captions / VQA files keyed by the integers."""
    from butd.heads.synth import SynthWorld, make_scenes, scene_captions

    scenes = make_scenes(SynthWorld(16, seed=0), len(ids), seed=1, max_objects=2)
    recs = [replace(s.record, image_id=i, extra={}) for s, i in zip(scenes, ids, strict=True)]
    write_feature_file(root / "f.h5", recs, model_version="synthetic", feature_dim=16)
    import random

    rng = random.Random(0)
    anns = [{"image_id": n, "id": k, "caption": c}
            for n, s in zip(annotation_ids, scenes, strict=False)
            for k, c in enumerate(scene_captions(s, rng, n=2))]  # fmt: skip
    (root / "captions.json").write_text(json.dumps({"annotations": anns, "images": []}))
    return root / "f.h5"


def _train_caption(root: Path) -> int:
    return run_heads_cli(["heads", "train", "caption", "--features", str(root / "f.h5"),
                          "--annotations", str(root / "captions.json"), "--out", str(root / "cap"),
                          "--steps", "2", "--batch-size", "4", "--min-count", "1",
                          "--hidden", "16"])  # fmt: skip


@pytest.mark.parametrize(
    "ids",
    [
        [f"val2014/COCO_val2014_{n:012d}.jpg" for n in (42, 73, 9, 10)],  # COCO files, path rule
        [f"{n:06d}.jpg" for n in (1, 2, 3, 4)],  # butd synth's images/000001.jpg ...
    ],
)
def test_heads_train_joins_integer_annotations(tmp_path: Path, ids: list[str], caplog) -> None:
    numbers = [coco_parts(i)[1] for i in ids]  # type: ignore[index]
    _heads_files(tmp_path, ids, [*numbers[:3], 999])  # the 4th annotation has no features
    with caplog.at_level(logging.INFO):
        assert _train_caption(tmp_path) == 0
    assert (tmp_path / "cap" / "last.pt").exists()
    assert "3 of 4 annotated images have features" in caplog.text
    assert repr(ids[0]) in caplog.text and "'999'" in caplog.text


def test_heads_train_without_any_match_stops_with_a_message(tmp_path: Path) -> None:
    _heads_files(tmp_path, ["cat.jpg", "dog.jpg"], [1, 2])
    with pytest.raises(SystemExit) as stop:
        _train_caption(tmp_path)
    text = str(stop.value)
    assert "no annotated image has features" in text
    assert "0 of 2 annotated images" in text and "'1'" in text and "'cat.jpg'" in text


def test_batch_job_items_follow_the_rule(tmp_path: Path) -> None:
    from butd.service.datasets import expand

    root = tmp_path / "val2014"
    root.mkdir()
    for name in ("COCO_val2014_000000000042.jpg", "dog.jpg"):
        (root / name).write_bytes(b"x")
    found = expand([str(root)], [tmp_path], [".jpg"], IdPolicy("coco"))
    assert [i.image_id for i in found.items] == ["42"]  # the refused name fails only itself
    assert "neither COCO" in found.skipped["dog.jpg"]
    assert [i.image_id for i in expand([str(root)], [tmp_path], [".jpg"]).items] == [
        "COCO_val2014_000000000042.jpg", "dog.jpg"
    ]  # fmt: skip
