"""COCO caption metrics in pure Python: BLEU-1..4, ROUGE-L, CIDEr-D.

They follow pycocoevalcap 1.2 (tylin/coco-caption) exactly on pre-tokenised input
(space-separated tokens); the tests compare against pycocoevalcap on the same inputs.

- BLEU: corpus level, clipped n-gram precision, brevity penalty against the CLOSEST reference
  length, BLEU-n = (Π_{m≤n} p_m)^{1/n} · BP.
- ROUGE-L: LCS precision and recall maximised separately over the references,
  F = (1+β²)PR / (R + β²P) with β = 1.2, averaged over images.
- CIDEr-D: tf-idf n-gram vectors (n = 1..4), idf = log(#images) − log(df); clipped
  min(hyp, ref)·ref dot products, Gaussian length penalty e^{−Δ²/(2·6²)} where the "length" is
  the bigram count (as in the original), averaged over n and references, × 10. The document
  frequencies come from the evaluated references, or from training references for SCST.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

Ngrams = Counter[tuple[str, ...]]


def ngrams(tokens: Sequence[str], n: int) -> Ngrams:
    """Counts of all 1..n-grams."""
    out: Ngrams = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            out[tuple(tokens[i : i + k])] += 1
    return out


def bleu(gts: Mapping[str, Sequence[str]], res: Mapping[str, str], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n. ``gts``: id -> reference strings; ``res``: id -> one hypothesis."""
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key, hyp in res.items():
        h = hyp.split()
        refs = [r.split() for r in gts[key]]
        max_counts: dict[tuple[str, ...], int] = {}
        for r in refs:
            for g, c in ngrams(r, n).items():
                max_counts[g] = max(max_counts.get(g, 0), c)
        test_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in refs)[1]
        for g, c in ngrams(h, n).items():
            correct[len(g) - 1] += min(max_counts.get(g, 0), c)
        for k in range(n):
            guess[k] += max(len(h) - k, 0)
    scores, prod = [], 1.0
    for k in range(n):
        prod *= (correct[k] + 1e-15) / (guess[k] + 1e-9)
        scores.append(prod ** (1.0 / (k + 1)))
    ratio = (test_len + 1e-15) / (ref_len + 1e-9)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(gts: Mapping[str, Sequence[str]], res: Mapping[str, str], beta: float = 1.2) -> float:
    """Mean over images of the ROUGE-L F-measure."""
    scores = []
    for key, hyp in res.items():
        h = hyp.split()
        precs, recs = [], []
        for ref in gts[key]:
            r = ref.split()
            lcs = _lcs(r, h)
            precs.append(lcs / len(h) if h else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        p, r_ = max(precs), max(recs)
        scores.append((1 + beta**2) * p * r_ / (r_ + beta**2 * p) if p and r_ else 0.0)
    return sum(scores) / len(scores)


class CiderD:
    """CIDEr-D scorer; ``document_frequency`` fixed at construction (per test set or train set)."""

    def __init__(self, references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> None:
        """references: for each image, its reference strings (used for df and log #images)."""
        self.n, self.sigma = n, sigma
        self.df: Counter[tuple[str, ...]] = Counter()
        for refs in references:
            for g in {g for r in refs for g in ngrams(r.split(), n)}:
                self.df[g] += 1
        self.log_images = math.log(float(len(references)))

    def _vec(self, counts: Ngrams) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        vec: list[dict[tuple[str, ...], float]] = [defaultdict(float) for _ in range(self.n)]
        norm, length = [0.0] * self.n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            vec[k][g] = tf * (self.log_images - math.log(max(1.0, self.df[g])))
            norm[k] += vec[k][g] ** 2
            if k == 1:
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    def score(self, hypothesis: str, references: Sequence[str]) -> float:
        """CIDEr-D of one hypothesis against its references."""
        vh, nh, lh = self._vec(ngrams(hypothesis.split(), self.n))
        total = [0.0] * self.n
        for ref in references:
            vr, nr, lr = self._vec(ngrams(ref.split(), self.n))
            penalty = math.exp(-((lh - lr) ** 2) / (2 * self.sigma**2))
            for k in range(self.n):
                val = sum(min(c, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, c in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * penalty
        return sum(total) / self.n / len(references) * 10.0


def cider_d(gts: Mapping[str, Sequence[str]], res: Mapping[str, str]) -> tuple[float, list[float]]:
    """Corpus CIDEr-D (df from the evaluated references) and the per-image scores."""
    keys = list(res)
    scorer = CiderD([gts[k] for k in keys])
    scores = [scorer.score(res[k], gts[k]) for k in keys]
    return sum(scores) / len(scores), scores
