"""VQA accuracy exactly as the official evaluator (GT-Vision-Lab/VQA ``vqaEval.py``).

Acc(a) = 1/10 Σ_{i=1..10} min(1, #{j ≠ i : h_j = a} / 3), which for n matching humans is
0, .3, .6, .9, 1 for n = 0, 1, 2, 3, ≥ 4 (heads-reference §8.1).

Normalisation follows the current (Python 3) evaluator: whitespace cleanup always; punctuation,
number-word, article and contraction rules applied to the prediction and the 10 human answers
only when the humans do not all agree (``if len(set(gtAnswers)) > 1``). The tables below are
copied from that file, including its curly-quote contractions and its regex typo
``(?!<=\\d)`` (a lookahead, not a lookbehind).
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn’t’ve",
    "couldnt’ve": "couldn’t’ve",
    "didnt": "didn’t",
    "doesnt": "doesn’t",
    "dont": "don’t",
    "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve",
    "hadn'tve": "hadn’t’ve",
    "hasnt": "hasn’t",
    "havent": "haven’t",
    "hed": "he’d",
    "hed’ve": "he’d’ve",
    "he’dve": "he’d’ve",
    "hes": "he’s",
    "howd": "how’d",
    "howll": "how’ll",
    "hows": "how’s",
    "Id’ve": "I’d’ve",
    "I’dve": "I’d’ve",
    "Im": "I’m",
    "Ive": "I’ve",
    "isnt": "isn’t",
    "itd": "it’d",
    "itd’ve": "it’d’ve",
    "it’dve": "it’d’ve",
    "itll": "it’ll",
    "let’s": "let’s",
    "maam": "ma’am",
    "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve",
    "mightn’tve": "mightn’t’ve",
    "mightve": "might’ve",
    "mustnt": "mustn’t",
    "mustve": "must’ve",
    "neednt": "needn’t",
    "notve": "not’ve",
    "oclock": "o’clock",
    "oughtnt": "oughtn’t",
    "ow’s’at": "’ow’s’at",
    "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at",
    "shant": "shan’t",
    "shed’ve": "she’d’ve",
    "she’dve": "she’d’ve",
    "she’s": "she’s",
    "shouldve": "should’ve",
    "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve",
    "shouldn’tve": "shouldn’t’ve",
    "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve",
    "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll",
    "somebodys": "somebody’s",
    "someoned": "someone’d",
    "someoned’ve": "someone’d’ve",
    "someone’dve": "someone’d’ve",
    "someonell": "someone’ll",
    "someones": "someone’s",
    "somethingd": "something’d",
    "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve",
    "somethingll": "something’ll",
    "thats": "that’s",
    "thered": "there’d",
    "thered’ve": "there’d’ve",
    "there’dve": "there’d’ve",
    "therere": "there’re",
    "theres": "there’s",
    "theyd": "they’d",
    "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve",
    "theyll": "they’ll",
    "theyre": "they’re",
    "theyve": "they’ve",
    "twas": "’twas",
    "wasnt": "wasn’t",
    "wed’ve": "we’d’ve",
    "we’dve": "we’d’ve",
    "weve": "we've",
    "werent": "weren’t",
    "whatll": "what’ll",
    "whatre": "what’re",
    "whats": "what’s",
    "whatve": "what’ve",
    "whens": "when’s",
    "whered": "where’d",
    "wheres": "where's",
    "whereve": "where’ve",
    "whod": "who’d",
    "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve",
    "wholl": "who’ll",
    "whos": "who’s",
    "whove": "who've",
    "whyll": "why’ll",
    "whyre": "why’re",
    "whys": "why’s",
    "wont": "won’t",
    "wouldve": "would’ve",
    "wouldnt": "wouldn’t",
    "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve",
    "yall": "y’all",
    "yall’ll": "y’all’ll",
    "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve",
    "y’alld’ve": "y’all’d’ve",
    "y’all’dve": "y’all’d’ve",
    "youd": "you’d",
    "youd’ve": "you’d’ve",
    "you’dve": "you’d’ve",
    "youll": "you’ll",
    "youre": "you’re",
    "youve": "you’ve",
}

_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MANUAL_MAP = {"none": "0", **{w: str(i) for i, w in enumerate(_NUMBERS)}}
ARTICLES = ("a", "an", "the")
PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`",
         ",", "?")  # fmt: skip
# The evaluator's regexes, verbatim (the lookbehind typo included).
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")


def process_punctuation(text: str) -> str:
    """``processPunctuation``: drop or space out punctuation, strip periods not in numbers."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The original passes re.UNICODE (= 32) as ``count``: at most 32 periods are removed.
    return PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """``processDigitArticle``: lower-case, number words to digits, drop articles, contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def normalize_answer(answer: str) -> str:
    """Full normalisation (punctuation then digits/articles), as used to build answer sets."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(answer))


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the (10) human answers."""
    gts = [_clean(a) for a in human_answers]
    pred = _clean(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    accs = []
    for i in range(len(gts)):
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def soft_score(count: int) -> float:
    """Soft target for an answer given by ``count`` of 10 humans: 0 / .3 / .6 / .9 / 1."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def soft_scores(human_answers: Sequence[str]) -> dict[str, float]:
    """{normalised answer: soft score} for one question (hengyuan-hu ``compute_target``)."""
    counts = Counter(normalize_answer(a) for a in human_answers)
    return {a: soft_score(n) for a, n in counts.items()}


@dataclass(frozen=True)
class VQAResult:
    """Accuracies in percent, rounded to 2 decimals like the official evaluator."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float]


def evaluate_vqa(
    predictions: Mapping[int, str], annotations: Sequence[Mapping[str, object]]
) -> VQAResult:
    """Official evaluation over VQA v2 annotation dicts (``answers``, ``question_id``, types).

    Args:
        predictions: question_id -> predicted answer string.
        annotations: the ``annotations`` list of a VQA v2 annotation file (only those with a
            prediction are evaluated).
    """
    per_q: dict[int, float] = {}
    by_ans: dict[str, list[float]] = defaultdict(list)
    by_ques: dict[str, list[float]] = defaultdict(list)
    for ann in annotations:
        qid = int(ann["question_id"])  # type: ignore[call-overload]
        if qid not in predictions:
            continue
        humans = [str(a["answer"]) for a in ann["answers"]]  # type: ignore[attr-defined]
        acc = vqa_accuracy(predictions[qid], humans)
        per_q[qid] = acc
        by_ans[str(ann.get("answer_type", "all"))].append(acc)
        by_ques[str(ann.get("question_type", "all"))].append(acc)
    if not per_q:
        raise ValueError("no annotated question has a prediction")

    def pct(xs: Sequence[float]) -> float:
        return round(100.0 * sum(xs) / len(xs), 2)

    return VQAResult(
        pct(list(per_q.values())),
        {k: pct(v) for k, v in by_ans.items()},
        {k: pct(v) for k, v in by_ques.items()},
        {q: round(100.0 * a, 2) for q, a in per_q.items()},
    )
