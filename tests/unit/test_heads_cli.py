"""Readers, vocabularies and the command line end to end on a tiny simulated feature file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from butd.heads.data import (
    build_answer_set,
    read_coco_captions,
    read_karpathy,
    read_vqa,
    vqa_examples,
)
from butd.heads.visualise import attention_panels
from butd.heads.vocab import EOS, PAD, Vocabulary, left_pad, pad_captions, tokenize_question
from tests.heads_data import run_heads_cli, write_heads_dataset

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """12 simulated scenes as a ragged feature file + Karpathy and VQA v2 JSON files."""
    return write_heads_dataset(tmp_path_factory.mktemp("heads"), dim=32, scenes=12)


def test_readers_and_soft_targets(dataset: dict[str, Path]) -> None:
    items = read_vqa(dataset["questions"], dataset["annotations"])
    assert len(items[0].answers) == 10
    answers = build_answer_set((a for it in items for a in it.answers), min_count=3)
    vocab = Vocabulary.build((tokenize_question(it.question) for it in items), min_count=1)
    ex = vqa_examples(items, {it.image_id: 0 for it in items}, vocab, answers)
    assert (
        ex.questions.shape == (len(items), 14) and ex.questions[:, 0].eq(PAD).all()
    )  # left-padded
    row = ex.targets(torch.tensor([0]))[0]
    first = items[0]
    for a in set(first.answers):
        if a in answers:
            n = first.answers.count(a)
            assert row[answers.index(a)].item() == pytest.approx(
                min(1.0, 0.3 * n) if n < 4 else 1.0
            )
    caps = read_karpathy(dataset["karpathy"])
    assert len(caps) == 12 and len(caps[0].captions) == 5


def test_sparse_vqa_targets_densify_to_the_soft_scores(dataset: dict[str, Path]) -> None:
    """Every question's dense target row, built per batch from the sparse (ids, scores), equals
    the soft scores counted directly: 0.3 per human up to 3, 1.0 from 4, 0 elsewhere."""
    items = read_vqa(dataset["questions"], dataset["annotations"])
    answers = build_answer_set((a for it in items for a in it.answers), min_count=2)
    vocab = Vocabulary.build((tokenize_question(it.question) for it in items), min_count=1)
    ex = vqa_examples(items, {it.image_id: 0 for it in items}, vocab, answers)
    dense = ex.targets(torch.arange(len(ex)))
    expected = torch.zeros(len(items), len(answers))
    for r, it in enumerate(items):
        for j, a in enumerate(answers):
            n = it.answers.count(a)
            expected[r, j] = 0.0 if n == 0 else (1.0 if n >= 4 else 0.3 * n)
    assert dense.shape == (len(items), len(answers)) and ex.answer_ids.shape[1] <= 10
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=0)
    assert (expected > 0).sum() > len(items)  # several answers per question on average
    picked = torch.tensor([3, 0, 3])  # any order, repeats allowed
    torch.testing.assert_close(ex.targets(picked), expected[picked], atol=1e-6, rtol=0)


def test_answer_set_threshold_counts_normalised_answers() -> None:
    answers = ["Two", "2", "two.", "red", "red", "blue"]
    assert build_answer_set(answers, min_count=2) == ["2", "red"]


def test_coco_caption_reader(tmp_path: Path) -> None:
    (tmp_path / "c.json").write_text(json.dumps({"annotations": [
        {"image_id": 1, "caption": "A cat."}, {"image_id": 1, "caption": "A dog."},
        {"image_id": 2, "caption": "A bus."}]}))  # fmt: skip
    items = {it.image_id: it.captions for it in read_coco_captions(tmp_path / "c.json")}
    assert items == {"1": ("A cat.", "A dog."), "2": ("A bus.",)}


def test_padding_helpers() -> None:
    inputs, targets = pad_captions([[5, 6, 7]], 6)
    assert inputs == [[1, 5, 6, 7, 0, 0]] and targets == [[5, 6, 7, EOS, 0, 0]]
    assert left_pad([4, 5], 4) == [0, 0, 4, 5]


def _run(argv: list[str]) -> None:
    assert run_heads_cli(argv) == 0


def test_cli_train_caption_and_answer(
    dataset: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = dataset["root"]
    _run(["heads", "train", "caption", "--features", str(dataset["features"]), "--annotations",
          str(dataset["karpathy"]), "--out", str(out / "cap"), "--steps", "3", "--batch-size", "8",
          "--min-count", "1", "--scst-steps", "1", "--hidden", "32"])  # fmt: skip
    assert (out / "cap" / "last.pt").exists() and (out / "cap" / "scst" / "last.pt").exists()
    _run(["heads", "train", "vqa", "--features", str(dataset["features"]), "--annotations",
          str(dataset["annotations"]), "--questions", str(dataset["questions"]), "--out",
          str(out / "vqa"), "--steps", "2", "--batch-size", "8", "--min-count", "1"])  # fmt: skip
    capsys.readouterr()
    _run(
        [
            "caption",
            "synth-1-0",
            "--model",
            str(out / "cap"),
            "--features",
            str(dataset["features"]),
            "--beam",
            "2",
        ]
    )
    cap = json.loads(capsys.readouterr().out)
    assert cap["image_id"] == "synth-1-0" and isinstance(cap["caption"], str)
    _run(["answer", "synth-1-0", "what color is the star?", "--model", str(out / "vqa"),
          "--features", str(dataset["features"]), "--top", "3"])  # fmt: skip
    ans = json.loads(capsys.readouterr().out)
    assert len(ans["answers"]) == 3


@pytest.mark.parametrize(
    ("head", "extra", "expected"),
    [
        ("adaptive", [], [(2, False, 0.0), (4, True, 0.0)]),  # half without the sentinel
        ("adaptive", ["--sentinel-warmup", "0.75"], [(3, False, 0.0), (4, True, 0.0)]),
        ("adaptive", ["--sentinel-warmup", "0"], [(4, True, 0.0)]),  # Lu et al.: jointly
        ("sat", [], [(4, True, 1.0)]),  # Xu et al.'s λ
        ("sat", ["--ds-lambda", "0"], [(4, True, 0.0)]),
    ],
)
def test_caption_training_phases_and_penalty(
    dataset: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    head: str,
    extra: list[str],
    expected: list[tuple[int, bool, float]],
) -> None:
    """--sentinel-warmup splits an adaptive run into (until, sentinel on) phases; --ds-lambda
    reaches SAT's loss; the checkpoint meta records both."""
    from butd.heads import cli_train
    from butd.heads.captioners import AdaptiveCore

    seen: list[tuple[int, bool, float]] = []

    def fake_fit(model, loss_fn, n, settings, out_dir, meta, until):  # type: ignore[no-untyped-def]
        core = model.core
        sentinel = core.use_sentinel if isinstance(core, AdaptiveCore) else True
        lambdas: list[float] = []
        monkeypatch.setattr(
            cli_train, "caption_batch_loss", lambda m, r, ex, idx, lam: lambdas.append(lam)
        )
        loss_fn(torch.arange(2))
        seen.append((until, sentinel, lambdas[0]))
        (out_dir / "meta.json").write_text(json.dumps(meta))
        return []

    monkeypatch.setattr(cli_train, "fit", fake_fit)
    out = dataset["root"] / f"phases-{head}-{len(extra)}-{extra[-1] if extra else ''}"
    _run(["heads", "train", "caption", "--features", str(dataset["features"]), "--annotations",
          str(dataset["karpathy"]), "--out", str(out), "--steps", "4", "--min-count", "1",
          "--hidden", "16", "--head", head, *extra])  # fmt: skip
    assert seen == expected
    meta = json.loads((out / "meta.json").read_text())
    if head == "sat":
        assert meta["ds_lambda"] == expected[0][2]
    else:
        assert meta["sentinel_warmup_steps"] == (expected[0][0] if len(expected) == 2 else 0)


@pytest.mark.parametrize("task", ["caption", "vqa"])
def test_train_device_reaches_model_examples_and_regions(
    dataset: dict[str, Path], monkeypatch: pytest.MonkeyPatch, task: str
) -> None:
    """--device moves the head and the examples and makes FileRegions pad batches there
    (PyTorch's shape-only ``meta`` device stands in for a GPU here; tests/gpu trains on CUDA)."""
    from butd.heads import cli_train

    seen: dict[str, str] = {}
    real_regions = cli_train.FileRegions

    def regions(*args: object, **kwargs: object) -> object:
        seen["regions"] = str(kwargs["device"])
        return real_regions(*args, **kwargs)  # type: ignore[arg-type]

    def fake_fit(model, loss_fn, n, settings, out_dir, meta, until=None):  # type: ignore[no-untyped-def]
        seen["model"] = str(next(model.parameters()).device)
        cells = loss_fn.__closure__ or ()
        examples = [c.cell_contents for c in cells if hasattr(c.cell_contents, "image_rows")]
        seen["examples"] = str(examples[0].image_rows.device)
        return []

    monkeypatch.setattr(cli_train, "FileRegions", regions)
    monkeypatch.setattr(cli_train, "fit", fake_fit)
    files = ["--annotations", str(dataset["karpathy"])]
    if task == "vqa":
        files = ["--annotations", str(dataset["annotations"]), "--questions",
                 str(dataset["questions"])]  # fmt: skip
    _run(["heads", "train", task, "--features", str(dataset["features"]), *files, "--out",
          str(dataset["root"] / f"meta-{task}"), "--steps", "2", "--min-count", "1",
          "--hidden", "16", "--device", "meta"])  # fmt: skip
    assert seen == {"regions": "meta", "model": "meta", "examples": "meta"}


def test_sentinel_warmup_must_be_a_fraction(dataset: dict[str, Path]) -> None:
    with pytest.raises(SystemExit):
        _run(["heads", "train", "caption", "--features", str(dataset["features"]),
              "--annotations", str(dataset["karpathy"]), "--out", str(dataset["root"] / "x"),
              "--sentinel-warmup", "1.5"])  # fmt: skip


def test_training_resumes_from_checkpoint(dataset: dict[str, Path]) -> None:
    out = dataset["root"] / "resume"
    base = ["heads", "train", "vqa", "--features", str(dataset["features"]), "--annotations",
            str(dataset["annotations"]), "--questions", str(dataset["questions"]),
            "--out", str(out),
            "--batch-size", "8", "--min-count", "1"]  # fmt: skip
    _run([*base, "--steps", "2"])
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 2
    _run([*base, "--steps", "4"])
    assert torch.load(out / "last.pt", weights_only=False)["step"] == 4


def test_attention_panels_shade_the_attended_region() -> None:
    image = np.full((100, 200, 3), 200, np.uint8)
    boxes = np.array([[0, 0, 50, 50], [100, 50, 200, 100]], np.float32)
    weights = np.array([[1, 0], [0, 1], [0.5, 0.5]])
    grid = attention_panels(
        image, boxes, ["red", "circle", "x"], weights, columns=2, panel_width=200
    )
    assert grid.shape == (200, 400, 3) and grid.dtype == np.uint8
    first = grid[:100, :200]
    assert first[30:45, 30:45].mean() > first[60:90, 120:180].mean() + 50  # attended is brighter
    second = grid[:100, 200:]
    assert second[60:90, 120:180].mean() > second[30:45, 30:45].mean() + 50
    with pytest.raises(ValueError, match="weights must be"):
        attention_panels(image, boxes, ["a"], np.ones((2, 2)))
