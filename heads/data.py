"""Readers for COCO captions (+ Karpathy split) and VQA v2, and tensorised example sets.

Shape glossary:
    C   captions,  Q   questions,  T   caption length,  L   question length (14),
    N   candidate answers
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from heads.metrics.vqa_accuracy import normalize_answer, soft_scores
from heads.vocab import Vocabulary, left_pad, pad_captions, tokenize_caption, tokenize_question


@dataclass(frozen=True)
class CaptionItem:
    """One image of a caption dataset with its raw reference captions."""

    image_id: str
    captions: tuple[str, ...]
    split: str = "train"


@dataclass(frozen=True)
class VQAItem:
    """One VQA question with its 10 human answers (empty for test questions)."""

    question_id: int
    image_id: str
    question: str
    answers: tuple[str, ...]
    answer_type: str = ""
    question_type: str = ""


def read_karpathy(
    path: str | Path, splits: Iterable[str] = ("train", "restval")
) -> list[CaptionItem]:
    """Karpathy's ``dataset_coco.json``: images with ``split``, ``cocoid`` and ``sentences``."""
    wanted = set(splits)
    data = json.loads(Path(path).read_text())
    items = []
    for img in data["images"]:
        if img["split"] in wanted:
            caps = tuple(s.get("raw") or " ".join(s["tokens"]) for s in img["sentences"])
            items.append(CaptionItem(str(img.get("cocoid", img.get("imgid"))), caps, img["split"]))
    return items


def read_coco_captions(path: str | Path, split: str = "train") -> list[CaptionItem]:
    """COCO ``captions_*.json`` (``annotations`` with ``image_id`` and ``caption``)."""
    data = json.loads(Path(path).read_text())
    caps: dict[str, list[str]] = {}
    for ann in data["annotations"]:
        caps.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return [CaptionItem(k, tuple(v), split) for k, v in caps.items()]


def read_vqa(questions_path: str | Path, annotations_path: str | Path | None) -> list[VQAItem]:
    """VQA v2 questions JSON joined with its annotations JSON (None for test splits)."""
    questions = json.loads(Path(questions_path).read_text())["questions"]
    anns: dict[int, Mapping[str, Any]] = {}
    if annotations_path is not None:
        anns = {
            a["question_id"]: a
            for a in json.loads(Path(annotations_path).read_text())["annotations"]
        }
    items = []
    for q in questions:
        a = anns.get(q["question_id"], {})
        items.append(
            VQAItem(
                int(q["question_id"]),
                str(q["image_id"]),
                q["question"],
                tuple(x["answer"] for x in a.get("answers", ())),
                a.get("answer_type", ""),
                a.get("question_type", ""),
            )
        )
    return items


def build_answer_set(answers: Iterable[str], min_count: int = 9) -> list[str]:
    """Normalised answers seen at least ``min_count`` times (hengyuan-hu: 9 -> 3129 on VQA v2),
    most frequent first. Pass each question's ``multiple_choice_answer`` (or all human answers)."""
    counts = Counter(normalize_answer(a) for a in answers)
    return sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))


@dataclass(frozen=True)
class VQAExamples:
    """image_rows (Q,) rows into a RegionBatch, questions (Q, L), targets (Q, N), raw items."""

    image_rows: torch.Tensor
    questions: torch.Tensor
    targets: torch.Tensor
    items: tuple[VQAItem, ...]

    def __len__(self) -> int:
        return int(self.image_rows.shape[0])


def vqa_examples(
    items: Sequence[VQAItem],
    image_rows: Mapping[str, int],
    vocab: Vocabulary,
    answers: Sequence[str],
    max_len: int = 14,
) -> VQAExamples:
    """Left-padded question ids and soft-score targets over ``answers``."""
    index = {a: i for i, a in enumerate(answers)}
    kept = [it for it in items if it.image_id in image_rows]
    targets = torch.zeros(len(kept), len(answers))
    for r, it in enumerate(kept):
        for a, s in soft_scores(it.answers).items():
            if a in index:
                targets[r, index[a]] = s
    qs = [left_pad(vocab.encode(tokenize_question(it.question)), max_len) for it in kept]
    rows = [image_rows[it.image_id] for it in kept]
    return VQAExamples(torch.tensor(rows), torch.tensor(qs, dtype=torch.long), targets, tuple(kept))


@dataclass(frozen=True)
class CaptionExamples:
    """image_rows (C,), inputs (C, T) from <bos>, targets (C, T) to <eos>; references per row."""

    image_rows: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    references: dict[int, list[str]]

    def __len__(self) -> int:
        return int(self.image_rows.shape[0])


def caption_examples(
    items: Sequence[CaptionItem],
    image_rows: Mapping[str, int],
    vocab: Vocabulary,
    max_len: int = 20,
    keep_commas: bool = False,
) -> CaptionExamples:
    """One example per (image, reference caption); tokens truncated to ``max_len`` - 1."""
    rows, seqs, refs = [], [], {}
    for it in items:
        if it.image_id not in image_rows:
            continue
        row = image_rows[it.image_id]
        refs[row] = list(it.captions)
        for c in it.captions:
            rows.append(row)
            seqs.append(vocab.encode(tokenize_caption(c, keep_commas=keep_commas)))
    inputs, targets = pad_captions(seqs, max_len + 1)
    return CaptionExamples(torch.tensor(rows), torch.tensor(inputs), torch.tensor(targets), refs)
