"""VQA accuracy and caption metrics against independent computations and pycocoevalcap."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter

import pytest

from butd.heads.metrics import evaluate as caption_eval
from butd.heads.metrics.captions import CiderD, bleu, cider_d, rouge_l
from butd.heads.metrics.vqa_accuracy import (
    evaluate_vqa,
    normalize_answer,
    soft_score,
    soft_scores,
    vqa_accuracy,
)


def _leave_one_out(pred: str, humans: list[str]) -> float:
    """Average over the 10 choose-9 subsets of min(1, matches / 3), written independently."""
    subsets = list(itertools.combinations(range(len(humans)), len(humans) - 1))
    return sum(min(1.0, sum(humans[j] == pred for j in s) / 3) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(11))
def test_vqa_accuracy_matches_leave_one_out_and_soft_scores(n: int) -> None:
    humans = ["cat"] * n + [f"other{i}" for i in range(10 - n)]
    random.Random(n).shuffle(humans)
    acc = vqa_accuracy("cat", humans)
    assert acc == pytest.approx(_leave_one_out("cat", humans))
    assert acc == pytest.approx(soft_score(min(n, 4)) if n <= 4 else 1.0)
    assert acc == pytest.approx(min(1.0, n * 0.3) if n < 4 else 1.0)


def test_official_normalisation_rules() -> None:
    assert normalize_answer("Two") == "2"
    assert normalize_answer("the dog.") == "dog"
    assert normalize_answer("dont") == "don’t"  # the evaluator's curly-quote contraction
    assert normalize_answer("1,000") == "1000"  # comma between digits removed
    assert normalize_answer("3.5") == "3.5"  # periods inside numbers kept
    assert normalize_answer("yes!") == "yes!"  # '!' is not in the evaluator's punctuation list
    assert normalize_answer("black/white") == "black white"


def test_prediction_normalised_only_when_humans_disagree() -> None:
    humans_agree = ["two"] * 10
    humans_split = ["two"] * 5 + ["2"] * 5
    assert vqa_accuracy("2", humans_agree) == 0.0  # quirk: no normalisation when all agree
    assert vqa_accuracy("two", humans_agree) == 1.0
    assert vqa_accuracy("Two.", humans_split) == 1.0  # all ten normalise to "2"


def test_soft_scores_and_evaluate_vqa() -> None:
    assert soft_scores(["Yes"] * 3 + ["no"] * 7) == {"yes": 0.9, "no": 1.0}
    anns = [
        {"question_id": 1, "answers": [{"answer": "red"}] * 2 + [{"answer": "blue"}] * 8,
         "answer_type": "other", "question_type": "what color"},
        {"question_id": 2, "answers": [{"answer": "yes"}] * 10, "answer_type": "yes/no",
         "question_type": "is there"},
    ]  # fmt: skip
    res = evaluate_vqa({1: "red", 2: "yes"}, anns)
    assert res.overall == pytest.approx(round(100 * (0.6 + 1.0) / 2, 2))
    assert res.per_answer_type == {"other": 60.0, "yes/no": 100.0}


def _corpus(seed: int) -> tuple[dict[str, list[str]], dict[str, str]]:
    rng = random.Random(seed)
    words = [
        "a",
        "the",
        "red",
        "blue",
        "green",
        "circle",
        "square",
        "star",
        "on",
        "of",
        "and",
        "there",
        "is",
        "an",
        "image",
        "two",
    ]
    gts = {
        str(i): [" ".join(rng.choices(words, k=rng.randint(3, 12))) for _ in range(5)]
        for i in range(40)
    }
    res = {str(i): " ".join(rng.choices(words, k=rng.randint(1, 12))) for i in range(40)}
    res["0"] = gts["0"][0]  # one exact match
    return gts, res


@pytest.mark.parametrize("seed", [0, 1])
def test_caption_metrics_match_pycocoevalcap(seed: int) -> None:
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = _corpus(seed)
    res_l = {k: [v] for k, v in res.items()}
    ref_bleu, _ = Bleu(4).compute_score(gts, res_l, verbose=0)
    assert bleu(gts, res) == pytest.approx(ref_bleu, rel=1e-9, abs=1e-12)
    assert rouge_l(gts, res) == pytest.approx(Rouge().compute_score(gts, res_l)[0], rel=1e-9)
    ref_cider, ref_per = Cider().compute_score(gts, res_l)
    ours, per = cider_d(gts, res)
    assert ours == pytest.approx(ref_cider, rel=1e-9)
    assert per == pytest.approx(list(ref_per), rel=1e-9)


def test_bleu_hand_computed() -> None:
    # hyp "the cat sat" vs ref "the cat sat down": p1 = p2 = p3 = 1, p4 = 0/0 (tiny/small),
    # brevity penalty exp(1 - 4/3).
    b = bleu({"x": ["the cat sat down"]}, {"x": "the cat sat"})
    bp = math.exp(1 - 4 / 3)
    assert b[0] == pytest.approx(bp) and b[1] == pytest.approx(bp) and b[2] == pytest.approx(bp)
    assert b[3] == pytest.approx(bp * (1e-15 / 1e-9) ** 0.25)  # the smoothing constants


def test_rouge_l_hand_computed() -> None:
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F = 3/4
    assert rouge_l({"x": ["a b c d"]}, {"x": "a c d e"}) == pytest.approx(0.75)


def test_cider_identical_captions_and_train_document_frequency() -> None:
    refs = [["a big red circle"] * 2, ["a small blue star"] * 2, ["two green squares here"] * 2]
    scorer = CiderD(refs)
    assert scorer.score("a big red circle", refs[0]) == pytest.approx(10.0)  # cosine 1 at n=1..4
    assert scorer.score("a red circle", refs[0]) < 7.5  # no 4-gram, shorter: penalised
    # df counts images, not captions: "a" occurs in 2 of 3 images
    assert scorer.df[("a",)] == 2 and scorer.df[("red", "circle")] == 1


def test_optional_java_metrics_never_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caption_eval, "java_available", lambda: False)
    out = caption_eval.evaluate_captions(
        {"1": ["A red circle."]}, {"1": "a red circle"}, spice=True
    )
    assert out["METEOR"] is None and out["SPICE"] is None
    assert out["CIDEr-D"] is not None and out["BLEU-1"] == pytest.approx(1.0)

    def broken() -> object:
        raise RuntimeError("jar missing")

    monkeypatch.setattr(caption_eval, "java_available", lambda: True)
    monkeypatch.setattr(caption_eval, "_spice", broken)
    assert (
        caption_eval.evaluate_captions({"1": ["a cat"]}, {"1": "a cat"}, meteor=False, spice=True)[
            "SPICE"
        ]
        is None
    )


def test_tokenizer_matches_ptb_on_simple_captions() -> None:
    pytest.importorskip("pycocoevalcap")
    if not caption_eval.java_available():
        pytest.skip("PTBTokenizer needs java")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = {
        "1": [{"caption": "A man riding a horse, on the beach."}, {"caption": "Two dogs play!"}]
    }
    ref = PTBTokenizer().tokenize(caps)
    ours = caption_eval.tokenize_all({"1": [c["caption"] for c in caps["1"]]})
    assert ours["1"] == ref["1"]
    assert Counter(ours["1"][0].split())["a"] == 2
