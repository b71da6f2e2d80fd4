"""``butd extract`` and ``butd show`` end to end on the tiny model's canonical weights file."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from butd.cli.main import main
from butd.store.h5 import FeatureFile
from tests.tiny_weights import make_tiny_weights


def _jpeg(rgb: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).resize(size).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("w") / "tiny.safetensors")


@pytest.fixture()
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "coffee.jpg").write_bytes(_jpeg(data.coffee(), (150, 100)))
    (root / "sub" / "cat.jpg").write_bytes(_jpeg(data.chelsea(), (120, 90)))
    (root / "broken.jpg").write_bytes(_jpeg(data.astronaut(), (100, 100))[:300])
    return root


def test_extract_directory_resumes_and_reports_bad_images(
    weights: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats.h5"
    assert main(["extract", str(images), "--out", str(out), "--weights", str(weights)]) == 0
    captured = capsys.readouterr()
    assert "2 extracted" in captured.out and "1 failed" in captured.out
    assert "broken.jpg" in captured.err and "Truncated" in captured.err
    with FeatureFile(out) as f:
        assert sorted(f.ids()) == ["coffee.jpg", "sub/cat.jpg"]
        record = f.get("sub/cat.jpg")
        assert (record.image_w, record.image_h) == (120, 90)
        assert record.features.dtype == np.float16
        assert f.objects_vocab[0] == "object0"

    # A second run over the same directory skips what is stored.
    assert main(["extract", str(images), "--out", str(out), "--weights", str(weights)]) == 0
    assert "0 extracted, 2 already present (same bytes), 0 refused" in capsys.readouterr().out


def test_resume_refuses_a_different_image_under_a_stored_name(
    weights: Path, images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "feats.h5"
    args = ["extract", str(images), "--out", str(out), "--weights", str(weights)]
    assert main(args) == 0
    with FeatureFile(out) as f:
        stored = dict(zip(f.ids(), f.content_sha256(), strict=True))
        before = f.get("coffee.jpg").features.copy()
    coffee = (images / "coffee.jpg").read_bytes()
    assert stored["coffee.jpg"] == hashlib.sha256(coffee).hexdigest()

    # Another photo under the stored name; a new image beside it.
    (images / "coffee.jpg").write_bytes(_jpeg(data.astronaut(), (150, 100)))
    (images / "new.jpg").write_bytes(_jpeg(data.rocket(), (90, 120)))
    capsys.readouterr()
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "1 extracted, 1 already present (same bytes), 1 refused" in captured.out
    assert "refused coffee.jpg: this id is stored from other bytes" in captured.err
    assert "--out" in captured.err
    with FeatureFile(out) as f:
        assert sorted(f.ids()) == ["coffee.jpg", "new.jpg", "sub/cat.jpg"]
        np.testing.assert_array_equal(f.get("coffee.jpg").features, before)  # untouched


def test_extract_with_a_boxes_file_and_fixed_count(
    weights: Path, images: Path, tmp_path: Path
) -> None:
    boxes = {"coffee.jpg": [[5, 5, 60, 70], [10, 20, 149, 99]]}
    boxes_file = tmp_path / "boxes.json"
    boxes_file.write_text(json.dumps(boxes))
    out = tmp_path / "given.h5"
    args = ["extract", str(images / "coffee.jpg"), str(images / "sub" / "cat.jpg")]
    args += ["--out", str(out), "--weights", str(weights), "--boxes", str(boxes_file)]
    assert main([*args, "--min-boxes", "5", "--max-boxes", "5", "--float32"]) == 0
    with FeatureFile(out) as f:
        coffee, cat = f.get("coffee.jpg"), f.get("cat.jpg")  # file arguments: bare names
    np.testing.assert_array_equal(coffee.boxes, np.array(boxes["coffee.jpg"], np.float32))
    assert cat.num_boxes == 5 and cat.features.dtype == np.float32


def test_show_draws_regions(weights: Path, images: Path, tmp_path: Path) -> None:
    out = tmp_path / "regions.png"
    args = ["show", str(images / "coffee.jpg"), "--out", str(out), "--weights", str(weights)]
    assert main(args) == 0
    drawn = np.asarray(Image.open(out).convert("RGB"))
    original = np.asarray(Image.open(images / "coffee.jpg").convert("RGB"))
    assert drawn.shape == original.shape
    # Box outlines change pixels; most of the image is untouched.
    changed = np.any(np.abs(drawn.astype(int) - original.astype(int)) > 40, axis=2).mean()
    assert 0.01 < changed < 0.9
