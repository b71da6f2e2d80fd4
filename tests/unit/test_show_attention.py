"""``butd show IMAGE --attention --captioner DIR``: one panel per word, shaded by attention."""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from butd.cli.main import main
from butd.heads.captioners import CaptionerConfig
from butd.heads.decoding import Captioner
from butd.heads.inference import caption, load_head
from butd.heads.objectives import caption_xe_loss
from butd.heads.regions import collate_records
from butd.heads.train import TrainSettings, fit
from butd.heads.vocab import Vocabulary, pad_captions
from tests.tiny_weights import make_tiny_weights

torch.set_num_threads(1)
CAPTION = ["a", "cup", "of", "coffee", "on", "a", "saucer"]
PANEL_W, COLUMNS = 320, 4  # attention_panels defaults


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny detector weights, one image, and a captioner overfitted to CAPTION on its regions."""
    from butd.detector.extractor import Extractor
    from butd.images import decode_image

    root = tmp_path_factory.mktemp("show")
    weights = make_tiny_weights(root / "tiny.safetensors")
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).resize((160, 120)).save(buf, format="PNG")
    (root / "coffee.png").write_bytes(buf.getvalue())
    extractor = Extractor.from_weights(str(weights), device="cpu", batch_size=1)
    record = extractor.extract([decode_image(buf.getvalue())], ["coffee.png"])[0]
    (root / "cap").mkdir()
    vocab = Vocabulary.build([CAPTION], min_count=1)
    inputs, targets = (torch.tensor(x) for x in pad_captions([vocab.encode(CAPTION)], 10))
    regions = collate_records([record])
    cfg = CaptionerConfig("adaptive", "additive", record.features.shape[1], 32, 16, 16, 0.0)
    torch.manual_seed(0)
    model = Captioner(len(vocab), cfg)
    with torch.no_grad():  # sharper attention than the tiny detector's features give by default
        model.core.attention.score.weight.mul_(30.0)
    meta = {"task": "caption", "head": "adaptive", "config": asdict(cfg), "vocab": vocab.words}
    fit(
        model,
        lambda _: caption_xe_loss(model, regions, inputs, targets),
        1,
        TrainSettings("adam", 150, 1, 1e-2, checkpoint_every=0),
        root / "cap",
        meta,
        progress=False,
    )
    return {"root": root, "weights": weights, "image": root / "coffee.png", "cap": root / "cap"}


def _panels(png: Path, count: int) -> list[np.ndarray]:
    grid = np.asarray(Image.open(png).convert("RGB")).astype(np.float32)
    h = grid.shape[0] // -(-count // COLUMNS)
    return [
        grid[(i // COLUMNS) * h : (i // COLUMNS + 1) * h, (i % COLUMNS) * PANEL_W :][:, :PANEL_W]
        for i in range(-(-count // COLUMNS) * COLUMNS)
    ]


def test_show_attention_draws_one_shaded_panel_per_word(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from butd.detector.extractor import Extractor
    from butd.images import decode_image

    out = setup["root"] / "attention.png"
    args = ["show", str(setup["image"]), "--attention", "--captioner", str(setup["cap"])]
    assert main([*args, "--out", str(out), "--weights", str(setup["weights"])]) == 0
    assert " ".join(CAPTION) in capsys.readouterr().out  # the overfitted caption came back
    # The same caption and attention, computed directly.
    extractor = Extractor.from_weights(str(setup["weights"]), device="cpu", batch_size=1)
    record = extractor.extract([decode_image(setup["image"].read_bytes())], ["coffee.png"])[0]
    model, meta = load_head(setup["cap"])
    result = caption(model, meta, record)
    assert result.words == CAPTION
    panels = _panels(out, len(CAPTION))
    assert len(panels) == 8 and panels[0].shape[1] == PANEL_W
    assert all(p.mean() > 20 for p in panels[: len(CAPTION)])  # drawn
    assert all(p.max() == 0 for p in panels[len(CAPTION) :])  # unused grid cells stay black
    att = result.attention.numpy()
    i, j = np.unravel_index(np.abs(att[:, None] - att[None]).sum(-1).argmax(), (len(att), len(att)))
    assert np.abs(att[i] - att[j]).sum() > 0.3  # two words that attend differently ...
    below_label = (slice(20, None), slice(None))
    diff = np.abs(panels[i][below_label] - panels[j][below_label]).mean()
    assert diff > 5.0, diff  # ... are shaded differently


def test_show_attention_needs_a_captioner(setup: dict[str, Path]) -> None:
    out = setup["root"] / "x.png"
    args = ["show", str(setup["image"]), "--attention", "--out", str(out)]
    assert main([*args, "--weights", str(setup["weights"])]) == 2
    assert not out.exists()
