"""The generate_tsv.py selection rule (reference §1.6, §14 step 8), vectorised over classes.

Shape glossary:
    R       proposals of one image (<= 300)
    K       object classes (1600); ``cls_prob`` has K + 1 columns, column 0 = background
    Q       classes solved together in one batch
    m       leading ranks of a class's ordering that a batch solves
    N       selected regions

The Caffe rule runs a greedy NMS over all R proposals for each class c = 1..K with the scores
``cls_prob[:, c]`` and records, for each proposal, ``max_conf`` = the highest score of a class in
which it survived (0 if none). Selection keeps ``max_conf >= conf_thresh`` in proposal order, or
the top ``min_boxes`` / ``max_boxes`` by ``max_conf`` when the count falls outside that range.

Vectorised form, exactly equal to the loop:
  * The suppression relation (``IoU >= thresh``) is computed once for the R proposals.
  * A class is solved as :func:`butd.detector.boxes.greedy_keep` on its ranking, batched over
  classes. * ``max_conf`` only grows, and a class can only raise ``max_conf[i]`` through a score
    ``cls_prob[i, c] > max_conf[i]``. So a class with no such "beneficiary" box can be skipped,
    and a class need only be solved down to the rank of its lowest beneficiary (later ranks
    cannot suppress earlier ones).
  * A valid starting bound needs no NMS: a box that no overlapping box outranks in class c
    survives class c. This is checked for each box's best few classes.
  * Classes are then solved in rounds, most promising first (each box's best still-relevant
    classes, 1, then 4, 16, ... per box), until no class can change anything. Every solved class
    is solved exactly, so the pruning never changes the result. On detector-like scores a few
    dozen of the 1600 classes get solved; with all scores tied nothing can be pruned and every
    class is solved (seconds on one CPU core, still exact).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from butd.detector.boxes import greedy_keep, stable_descending, suppression_matrix

logger = logging.getLogger(__name__)

# Bound on Q * m * m, the pairwise booleans of one batch of classes (float32 copy: 4 bytes each).
_BATCH_ELEMENTS = 4_000_000
# Best classes per box checked for survivals that need no NMS (a cheap starting lower bound).
_SURE_CLASSES = 8
# Classes per box taken in the first round; multiplied by _GROWTH each round.
_FIRST_ROUND = 1
_GROWTH = 4


@dataclass(frozen=True)
class Selection:
    """Which proposals become regions.

    Attributes:
        indices: (N,) int64 indices into the proposals, in output order.
        max_conf: (R,) float32, per proposal the best score of a class it survived NMS in.
    """

    indices: torch.Tensor
    max_conf: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dtype != torch.int64 or self.indices.dim() != 1:
            raise ValueError(
                f"indices must be (N,) int64; got {tuple(self.indices.shape)} {self.indices.dtype}"
            )
        if self.max_conf.dtype != torch.float32 or self.max_conf.dim() != 1:
            raise ValueError(
                f"max_conf must be (R,) float32; got {tuple(self.max_conf.shape)} "
                f"{self.max_conf.dtype}"
            )


def select_regions(
    boxes: torch.Tensor,
    cls_prob: torch.Tensor,
    *,
    nms_thresh: float = 0.3,
    conf_thresh: float = 0.2,
    min_boxes: int = 10,
    max_boxes: int = 100,
    plus_one: bool = True,
    suppress_equal: bool = True,
) -> Selection:
    """Choose regions among proposals as Caffe ``generate_tsv.py`` does.

    Args:
        boxes: (R, 4) float32 proposals in original-image pixels (unregressed).
        cls_prob: (R, K + 1) float32 class probabilities, background in column 0.
        nms_thresh: per-class NMS IoU (Caffe TEST.NMS).
        conf_thresh: threshold on ``max_conf`` (compared in double precision like NumPy).
        min_boxes: at least this many regions (fewer only if R is smaller).
        max_boxes: at most this many regions.
        plus_one: legacy +1 IoU.
        suppress_equal: suppress at IoU == ``nms_thresh`` (Caffe ``cpu_nms``).

    Returns:
        Selection on the device of ``boxes``. Ties in ``max_conf`` order go to the lower index.
    """
    _check_inputs(boxes, cls_prob, min_boxes, max_boxes)
    boxes = boxes.to(torch.float32)
    scores = cls_prob[:, 1:].to(torch.float32)  # (R, K)
    suppress = suppression_matrix(
        boxes, boxes, nms_thresh, plus_one=plus_one, suppress_equal=suppress_equal
    )  # (R, R)
    max_conf = per_class_max_conf(suppress, scores)
    return Selection(_clamp_count(max_conf, conf_thresh, min_boxes, max_boxes), max_conf)


def _check_inputs(boxes: torch.Tensor, cls_prob: torch.Tensor, lo: int, hi: int) -> None:
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (R, 4); got {tuple(boxes.shape)}")
    if cls_prob.dim() != 2 or cls_prob.shape[0] != boxes.shape[0] or cls_prob.shape[1] < 1:
        raise ValueError(
            f"cls_prob must be (R, K+1) with R = {boxes.shape[0]}; got {tuple(cls_prob.shape)}"
        )
    if not 0 <= lo <= hi:
        raise ValueError(f"need 0 <= min_boxes <= max_boxes; got {lo}, {hi}")
    if torch.isnan(cls_prob).any():
        raise ValueError("cls_prob contains NaN")


def _clamp_count(max_conf: torch.Tensor, conf_thresh: float, lo: int, hi: int) -> torch.Tensor:
    """Indices with ``max_conf >= conf_thresh`` (proposal order), or the top lo / hi."""
    passing = torch.nonzero(max_conf.to(torch.float64) >= conf_thresh).flatten()
    n = passing.numel()
    if lo <= n <= hi:
        return passing
    return stable_descending(max_conf)[: lo if n < lo else hi]


def per_class_max_conf(suppress: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """``max_conf`` of the per-class greedy NMS loop, solved in pruned batched rounds.

    Args:
        suppress: (R, R) bool, ``[i, j]`` = proposal i suppresses j when i ranks first and is kept.
        scores: (R, K) float32 per-class scores (background removed).

    Returns:
        (R,) float32: for each proposal the maximum of 0 and its scores in the classes where it
        survived.
    """
    r, k = scores.shape
    if r == 0 or k == 0:
        return torch.zeros(r, dtype=torch.float32, device=scores.device)
    max_conf = _sure_lower_bound(suppress, scores, min(_SURE_CLASSES, k))
    solved = torch.zeros(k, dtype=torch.bool, device=scores.device)
    per_box, rounds, solved_total = _FIRST_ROUND, 0, 0
    while True:
        classes = _next_classes(scores, max_conf, solved, per_box)
        if classes.numel() == 0:
            break
        columns = scores.T[classes]  # (Q, R)
        order = stable_descending(columns)  # (Q, R) ranking of each class
        ranked = torch.gather(columns, 1, order)  # (Q, R) scores in rank order
        _solve_classes(suppress, order, ranked, _solve_depth(order, ranked, max_conf), max_conf)
        solved[classes] = True
        rounds, solved_total, per_box = (
            rounds + 1,
            solved_total + classes.numel(),
            per_box * _GROWTH,
        )
    logger.debug("per-class NMS: %d of %d classes solved in %d rounds", solved_total, k, rounds)
    return max_conf


def _sure_lower_bound(suppress: torch.Tensor, scores: torch.Tensor, top: int) -> torch.Tensor:
    """Lower bound of ``max_conf`` from survivals that need no NMS.

    A box none of whose suppressing neighbours outranks it in class c survives class c's NMS
    whatever happens to the other boxes. Checked for each box's ``top`` best classes.

    Args:
        suppress: (R, R) bool suppression relation.
        scores: (R, K) float32.
        top: classes checked per box.

    Returns:
        (R,) float32, each value a score the box certainly survives with (or 0).
    """
    r = scores.shape[0]
    best, cls = torch.topk(scores, top, dim=1)  # (R, T)
    others = scores.T[cls]  # (R, T, R): [i, t, j] = scores[j, cls[i, t]]
    idx = torch.arange(r, device=scores.device)
    # j outranks i in class cls[i, t]: a higher score, or an equal one and a lower index.
    outranks = (others > best[:, :, None]) | (
        (others == best[:, :, None]) & (idx[None, None, :] < idx[:, None, None])
    )
    beaten = (outranks & suppress.T[:, None, :]).any(dim=2)  # (R, T)
    return best.masked_fill(beaten, 0.0).amax(dim=1).clamp(min=0.0)


def _next_classes(
    scores: torch.Tensor, max_conf: torch.Tensor, solved: torch.Tensor, per_box: int
) -> torch.Tensor:
    """Unsolved classes that can still raise some ``max_conf``: each box's best ``per_box``.

    Returns:
        (Q,) int64 class columns, ascending; empty when no unsolved class matters.
    """
    useful = (scores > max_conf[:, None]) & ~solved[None, :]  # (R, K)
    # A useful score is > max_conf >= 0, so -1 marks exactly the slots that are not useful.
    masked = scores.masked_fill(~useful, -1.0)
    top = torch.topk(masked, min(per_box, scores.shape[1]), dim=1)  # (R, per_box)
    classes: torch.Tensor = torch.unique(top.indices[top.values >= 0.0])
    return classes


def _solve_depth(order: torch.Tensor, ranked: torch.Tensor, max_conf: torch.Tensor) -> torch.Tensor:
    """Per class, 1 + the last rank whose box could gain from the class (0 if none).

    Args:
        order: (Q, R) int64 proposals of each class in rank order.
        ranked: (Q, R) float32 their scores.
        max_conf: (R,) float32 current lower bounds.

    Returns:
        (Q,) int64 depth m_c.
    """
    gains = ranked > max_conf[order]  # (Q, R)
    positions = torch.arange(1, order.shape[1] + 1, device=order.device)
    return (gains * positions).amax(dim=1)


def _solve_classes(
    suppress: torch.Tensor,
    order: torch.Tensor,
    ranked: torch.Tensor,
    depth: torch.Tensor,
    max_conf: torch.Tensor,
) -> None:
    """Exact NMS of Q classes down to ``depth`` ranks, folded into ``max_conf`` in place.

    Args:
        suppress: (R, R) bool proposal suppression relation.
        order: (Q, R) int64 proposals in rank order per class.
        ranked: (Q, R) float32 their scores.
        depth: (Q,) int64 ranks to solve per class.
        max_conf: (R,) float32, updated in place.

    Classes are sorted by depth and cut into batches of at most ``_BATCH_ELEMENTS`` pairwise
    entries; each batch is padded to its deepest class (extra ranks are solved exactly too).
    """
    by_depth = torch.argsort(depth, descending=True)
    depths = depth[by_depth].tolist()
    start = 0
    while start < len(depths) and depths[start] > 0:
        m = depths[start]
        count = max(1, _BATCH_ELEMENTS // (m * m))
        batch = by_depth[start : start + count]
        _solve_batch(suppress, order[batch, :m], ranked[batch, :m], max_conf)
        start += count


def _solve_batch(
    suppress: torch.Tensor, order: torch.Tensor, ranked: torch.Tensor, max_conf: torch.Tensor
) -> None:
    """Greedy NMS of Q classes over their first m ranks; raise ``max_conf`` with survivors.

    Args:
        suppress: (R, R) bool proposal suppression relation.
        order: (Q, m) int64 proposals in rank order per class.
        ranked: (Q, m) float32 their scores.
        max_conf: (R,) float32, updated in place.
    """
    pairwise = suppress[order[:, :, None], order[:, None, :]]  # (Q, m, m) in rank order
    pairwise = torch.triu(pairwise, diagonal=1)  # only earlier ranks suppress later ones
    candidates = torch.ones_like(ranked, dtype=torch.bool)
    keep = greedy_keep(pairwise, candidates)  # (Q, m)
    gained = torch.where(keep, ranked, torch.zeros_like(ranked))
    max_conf.scatter_reduce_(0, order.flatten(), gained.flatten(), reduce="amax")
