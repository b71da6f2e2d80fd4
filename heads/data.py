"""Readers for COCO captions (+ Karpathy split) and VQA v2, and tensorised example sets.

Shape glossary:
    C   captions,  Q   questions,  T   caption length,  L   question length (14),
    N   candidate answers
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from butd.heads.metrics.vqa_accuracy import normalize_answer, soft_scores
from butd.heads.vocab import Vocabulary, left_pad, pad_captions, tokenize_caption, tokenize_question


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
    """Questions ready for training: image_rows (Q,) rows into a RegionBatch, questions (Q, L)
    left-padded, the soft-score targets kept sparse (``answer_ids`` / ``answer_scores`` (Q, A):
    the A ≤ 10 distinct human answers in the answer set, padded with score 0), raw items.

    ``targets(idx)`` builds the dense (B, N) rows of one batch: over VQA v2 train the dense
    (Q, N) matrix would take 443,757 × 3,129 × 4 bytes = 5.5 GB.
    """

    image_rows: torch.Tensor
    questions: torch.Tensor
    answer_ids: torch.Tensor
    answer_scores: torch.Tensor
    num_answers: int
    items: tuple[VQAItem, ...]

    def __len__(self) -> int:
        return int(self.image_rows.shape[0])

    def targets(self, idx: torch.Tensor) -> torch.Tensor:
        """(B, N) soft scores of questions ``idx`` (0 for answers no human gave)."""
        ids, scores = self.answer_ids[idx], self.answer_scores[idx]
        return scores.new_zeros(ids.shape[0], self.num_answers).scatter_add_(1, ids, scores)

    def to(self, device: torch.device | str) -> VQAExamples:
        """The same examples with their tensors on ``device``."""
        return replace(
            self,
            image_rows=self.image_rows.to(device),
            questions=self.questions.to(device),
            answer_ids=self.answer_ids.to(device),
            answer_scores=self.answer_scores.to(device),
        )


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
    sparse = [
        [(index[a], s) for a, s in soft_scores(it.answers).items() if a in index] for it in kept
    ]
    width = max((len(row) for row in sparse), default=0) or 1
    where = [(r, c) for r, row in enumerate(sparse) for c in range(len(row))]
    at = torch.tensor(where, dtype=torch.long).reshape(-1, 2)
    ids = torch.zeros(len(kept), width, dtype=torch.long)
    scores = torch.zeros(len(kept), width)
    ids[at[:, 0], at[:, 1]] = torch.tensor([i for row in sparse for i, _ in row], dtype=torch.long)
    scores[at[:, 0], at[:, 1]] = torch.tensor([s for row in sparse for _, s in row])
    qs = [left_pad(vocab.encode(tokenize_question(it.question)), max_len) for it in kept]
    rows = [image_rows[it.image_id] for it in kept]
    return VQAExamples(
        torch.tensor(rows),
        torch.tensor(qs, dtype=torch.long),
        ids,
        scores,
        len(answers),
        tuple(kept),
    )


@dataclass(frozen=True)
class CaptionExamples:
    """image_rows (C,), inputs (C, T) from <bos>, targets (C, T) to <eos>; references per row."""

    image_rows: torch.Tensor
    inputs: torch.Tensor
    targets: torch.Tensor
    references: dict[int, list[str]]

    def __len__(self) -> int:
        return int(self.image_rows.shape[0])

    def to(self, device: torch.device | str) -> CaptionExamples:
        """The same examples with their tensors on ``device``."""
        return replace(
            self,
            image_rows=self.image_rows.to(device),
            inputs=self.inputs.to(device),
            targets=self.targets.to(device),
        )


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
