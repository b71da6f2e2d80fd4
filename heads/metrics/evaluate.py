"""Caption evaluation: tokenise, then BLEU/ROUGE-L/CIDEr-D here, METEOR/SPICE only with Java.

METEOR and SPICE run the jars shipped with pycocoevalcap when both Java and that package are
present; any failure (no Java, no jar, no network for SPICE's CoreNLP download, Java ≥ 9 module
errors) is logged and the metric is reported as missing, never raised (heads-reference §8.2, §11).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from butd.heads.metrics.captions import bleu, cider_d, rouge_l
from butd.heads.vocab import tokenize_caption

logger = logging.getLogger(__name__)


def tokenize_all(captions: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """Tokenise and re-join with single spaces (the PTBTokenizer's role in COCOEvalCap)."""
    return {k: [" ".join(tokenize_caption(c)) for c in caps] for k, caps in captions.items()}


def java_available() -> bool:
    """True when a ``java`` binary is on PATH."""
    return shutil.which("java") is not None


def _optional(name: str, make: Callable[[], Any], gts: Any, res: Any) -> float | None:
    if not java_available():
        logger.info("%s not computed: no java on PATH", name)
        return None
    try:
        score, _ = make().compute_score(gts, res)
        return float(score)
    except Exception as exc:
        logger.warning("%s not computed: %s: %s", name, type(exc).__name__, exc)
        return None


def _meteor() -> Any:
    from pycocoevalcap.meteor.meteor import Meteor

    return Meteor()


def _spice() -> Any:
    from pycocoevalcap.spice.spice import Spice

    return Spice()


def evaluate_captions(
    references: Mapping[str, Sequence[str]],
    hypotheses: Mapping[str, str],
    *,
    meteor: bool = True,
    spice: bool = False,
) -> dict[str, float | None]:
    """COCO metrics (fractions, not ×100) on raw strings; missing optional metrics are None."""
    gts = tokenize_all(references)
    res = {k: " ".join(tokenize_caption(h)) for k, h in hypotheses.items()}
    b = bleu(gts, res)
    out: dict[str, float | None] = {f"BLEU-{i + 1}": s for i, s in enumerate(b)}
    out["ROUGE-L"] = rouge_l(gts, res)
    out["CIDEr-D"] = cider_d(gts, res)[0]
    res_lists = {k: [v] for k, v in res.items()}
    out["METEOR"] = _optional("METEOR", _meteor, gts, res_lists) if meteor else None
    out["SPICE"] = _optional("SPICE", _spice, gts, res_lists) if spice else None
    return out
