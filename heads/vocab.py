"""Word vocabularies for captions and questions, and caption/question tokenisation."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")

# Anderson's beam search lets only these stop-words repeat in a caption
# (Up-Down-Captioner scripts/create_caption_lstm.py, ``allowed_multiple``).
ALLOWED_MULTIPLE = (
    "a", "the", "of", ",", "on", "in", "with", "and", "an", '"', "to", "some", "at", "are",
    "it", "that", "'", "by",
)  # fmt: skip

# PTBTokenizer's dropped punctuation (pycocoevalcap tokenizer/ptbtokenizer.py).
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":",
                "-", "--", "...", ";"}  # fmt: skip
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def tokenize_caption(text: str, *, keep_commas: bool = False) -> list[str]:
    """Lower-case words; punctuation split off and dropped as PTBTokenizer does.

    ``keep_commas`` keeps "," tokens (the synthetic captions use them as list separators).
    """
    tokens = _TOKEN.findall(text.lower())
    return [t for t in tokens if t not in _PUNCTUATION or (keep_commas and t == ",")]


def tokenize_question(text: str) -> list[str]:
    """hengyuan-hu's ``Dictionary.tokenize``: lower, drop ',' and '?', split "'s"."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    return text.split()


class Vocabulary:
    """Index <-> word, with <pad>=0, <bos>=1, <eos>=2, <unk>=3."""

    def __init__(self, words: Sequence[str]) -> None:
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            words = [*SPECIALS, *[w for w in words if w not in SPECIALS]]
        self.words = list(words)
        self.index = {w: i for i, w in enumerate(self.words)}

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, sentences: Iterable[Sequence[str]], min_count: int = 5) -> Vocabulary:
        """Words seen at least ``min_count`` times (Karpathy: 5), most frequent first."""
        counts = Counter(w for s in sentences for w in s)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([*SPECIALS, *kept])

    def encode(self, tokens: Sequence[str]) -> list[int]:
        """Word ids, UNK for unknown words."""
        return [self.index.get(t, UNK) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words up to the first <eos>, skipping <pad>/<bos>."""
        out: list[str] = []
        for i in ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                out.append(self.words[i])
        return out

    def ids_of(self, words: Iterable[str]) -> list[int]:
        """Ids of the known words among ``words``."""
        return [self.index[w] for w in words if w in self.index]

    def save(self, path: str | Path) -> None:
        """Write the word list as JSON."""
        Path(path).write_text(json.dumps(self.words))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a word list written by ``save``."""
        return cls(json.loads(Path(path).read_text()))


def pad_captions(
    ids: Sequence[Sequence[int]], max_len: int
) -> tuple[list[list[int]], list[list[int]]]:
    """Teacher-forcing inputs [<bos> w1..wn] and targets [w1..wn <eos>], right-padded with 0."""
    inputs, targets = [], []
    for seq in ids:
        seq = list(seq)[: max_len - 1]
        inp = [BOS, *seq]
        tgt = [*seq, EOS]
        inputs.append(inp + [PAD] * (max_len - len(inp)))
        targets.append(tgt + [PAD] * (max_len - len(tgt)))
    return inputs, targets


def left_pad(ids: Sequence[int], length: int) -> list[int]:
    """hengyuan-hu question padding: keep the first ``length`` tokens, pad in front with 0."""
    ids = list(ids)[:length]
    return [PAD] * (length - len(ids)) + ids
