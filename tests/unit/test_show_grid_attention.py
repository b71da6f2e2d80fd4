"""``butd show --attention`` with a captioner over grid features: a heat map of the G x G
attention per word, hottest where the head looked."""

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
from butd.heads.regions import collate_records, grid_as_regions
from butd.heads.train import TrainSettings, fit
from butd.heads.visualise import grid_attention_panels
from butd.heads.vocab import Vocabulary, pad_captions
from tests.tiny_weights import make_tiny_weights

torch.set_num_threads(1)
CAPTION = ["a", "cup", "on", "a", "saucer"]
G, PANEL_W = 3, 320


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny detector weights, one image, an SCA captioner overfitted on its 3 x 3 grid."""
    from butd.detector.extractor import Extractor
    from butd.images import decode_image

    root = tmp_path_factory.mktemp("showgrid")
    weights = make_tiny_weights(root / "tiny.safetensors")
    buf = io.BytesIO()
    Image.fromarray(data.coffee()).resize((160, 120)).save(buf, format="PNG")
    (root / "coffee.png").write_bytes(buf.getvalue())
    ext = Extractor.from_weights(str(weights), device="cpu", batch_size=1, grid_size=G)
    record = ext.extract([decode_image(buf.getvalue())], ["coffee.png"])[0]
    vocab = Vocabulary.build([CAPTION], min_count=1)
    inputs, targets = (torch.tensor(x) for x in pad_captions([vocab.encode(CAPTION)], 8))
    regions = collate_records([grid_as_regions(record, G)])
    cfg = CaptionerConfig("sca", "additive", record.feature_dim, 32, 16, 16, 0.0, grid_size=G)
    torch.manual_seed(0)
    model = Captioner(len(vocab), cfg)
    with torch.no_grad():  # sharper spatial attention than the tiny detector's grid gives
        model.core.spat_score.weight.mul_(30.0)
    meta = {"task": "caption", "head": "sca", "config": asdict(cfg), "vocab": vocab.words}
    (root / "cap").mkdir()
    fit(model, lambda _: caption_xe_loss(model, regions, inputs, targets), 1,
        TrainSettings("adam", 120, 1, 1e-2, checkpoint_every=0), root / "cap", meta,
        progress=False)  # fmt: skip
    return {"root": root, "weights": weights, "image": root / "coffee.png", "cap": root / "cap"}


def test_show_attention_draws_the_grid_heat_map(
    setup: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from butd.detector.extractor import Extractor
    from butd.images import decode_image

    out = setup["root"] / "grid_attention.png"
    args = ["show", str(setup["image"]), "--attention", "--captioner", str(setup["cap"])]
    assert main([*args, "--out", str(out), "--weights", str(setup["weights"])]) == 0
    assert " ".join(CAPTION) in capsys.readouterr().out
    ext = Extractor.from_weights(str(setup["weights"]), device="cpu", batch_size=1, grid_size=G)
    record = ext.extract([decode_image(setup["image"].read_bytes())], ["coffee.png"])[0]
    model, meta = load_head(setup["cap"])
    att = caption(model, meta, record).attention.numpy()  # (T, G*G)
    png = np.asarray(Image.open(out).convert("RGB")).astype(np.float32)
    h = png.shape[0] // 2  # 5 words -> 2 rows of 4 panels
    base = np.asarray(Image.open(setup["image"]).convert("RGB").resize((PANEL_W, h)), np.float32)
    for t in range(len(CAPTION)):
        panel = png[(t // 4) * h : (t // 4 + 1) * h, (t % 4) * PANEL_W : (t % 4 + 1) * PANEL_W]
        tint = (panel[..., 0] - panel[..., 2]) - (base[..., 0] - base[..., 2])  # red added
        cells = att[t].reshape(G, G)
        hot, cold = np.unravel_index(cells.argmax(), cells.shape), np.unravel_index(
            cells.argmin(), cells.shape)  # fmt: skip

        def centre(cell: tuple[int, ...], img: np.ndarray = tint) -> float:
            r, c = cell
            ch, cw = h / G, PANEL_W / G
            y, x = int((r + 0.5) * ch), int((c + 0.5) * cw)
            return float(img[y - 3 : y + 4, x - 3 : x + 4].mean())

        if cells.max() > 2 * cells.min():  # a word that looks somewhere in particular
            assert centre(hot) > centre(cold) + 20, (t, cells)


def test_grid_panels_check_their_shapes() -> None:
    image = np.zeros((40, 60, 3), np.uint8)
    with pytest.raises(ValueError, match="G\\*G"):
        grid_attention_panels(image, ["a"], np.ones((1, 8)), 3)
    panels = grid_attention_panels(image + 100, ["a", "b"], np.eye(2, 4), 2, columns=2)
    assert panels.shape == (213, 640, 3)
