"""detectron2 checkpoint names and the tensor moves that bring them to the canonical layout.

All three published PyTorch ports (airsplay ``.pkl``, HF ``pytorch_model.bin``, MILVLG
``.pth``) use detectron2 module names (reference §9.2). The rename table is explicit and
loud: every canonical key has exactly one source key, and anything else in the source is an
error. Pure functions, no file I/O.

Shape glossary: A anchors per cell, K object classes, A_t attributes, D feature size,
R_c RPN channels, G channel group per anchor (1 for objectness, 4 for deltas).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from butd.detector.weights.canonical import WeightsError

# Canonical module -> detectron2 module, for the modules outside the ResNet blocks.
D2_COMMON_MODULES: dict[str, str] = {
    "rpn.conv": "proposal_generator.rpn_head.conv",
    "rpn.objectness": "proposal_generator.rpn_head.objectness_logits",
    "rpn.deltas": "proposal_generator.rpn_head.anchor_deltas",
    "roi_heads.cls_score": "roi_heads.box_predictor.cls_score",
    "roi_heads.bbox_pred": "roi_heads.box_predictor.bbox_pred",
}
# Attribute head names: airsplay and HF (reference §2.2, §4.1).
AIRSPLAY_ATTR_MODULES: dict[str, str] = {
    "roi_heads.attr.embedding": "roi_heads.box_predictor.cls_embedding",
    "roi_heads.attr.fc": "roi_heads.box_predictor.fc_attr",
    "roi_heads.attr.score": "roi_heads.box_predictor.attr_score",
}
# Attribute head names: MILVLG ``BUACaffeFastRCNNOutputLayers`` (reference §3.2).
MILVLG_ATTR_MODULES: dict[str, str] = {
    "roi_heads.attr.embedding": "roi_heads.box_predictor.cls_embed",
    "roi_heads.attr.fc": "roi_heads.box_predictor.attr_linear1",
    "roi_heads.attr.score": "roi_heads.box_predictor.attr_linear2",
}
# The HF AnchorGenerator keeps its cell anchors as a parameter (reference §4.1).
D2_CELL_ANCHORS_KEY = "proposal_generator.anchor_generator.cell_anchors.0"

# ResNet block renames, canonical -> detectron2 (reference §9.2): stem.conv -> stem.conv1,
# bnK -> convK.norm, shortcut_bn -> shortcut.norm.
_BLOCK_RULES: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^backbone\.stem\.conv\.weight$"), "backbone.stem.conv1.weight"),
    (re.compile(r"^backbone\.stem\.bn\.(\w+)$"), r"backbone.stem.conv1.norm.\1"),
    (re.compile(r"^(.*\.res\d\.\d+)\.bn([123])\.(\w+)$"), r"\1.conv\2.norm.\3"),
    (re.compile(r"^(.*\.res\d\.\d+)\.shortcut_bn\.(\w+)$"), r"\1.shortcut.norm.\2"),
)


def d2_name(key: str, attr_modules: Mapping[str, str]) -> str:
    """detectron2 name of a canonical key.

    Args:
        key: canonical key, e.g. ``backbone.res4.5.bn2.running_var``.
        attr_modules: the format's attribute-head module names.

    Returns:
        e.g. ``backbone.res4.5.conv2.norm.running_var``.
    """
    module, _, param = key.rpartition(".")
    table = {**D2_COMMON_MODULES, **attr_modules}
    if module in table:
        return f"{table[module]}.{param}"
    for pattern, replacement in _BLOCK_RULES:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key  # convK.weight and shortcut.weight keep their names


def roll_last_to_first(t: torch.Tensor) -> torch.Tensor:
    """Move the last row to row 0: (N, ...) -> (N, ...).

    Used for detectron2's background class (last of K+1) and airsplay's "no attribute"
    (last of A_t+1), which Caffe and the canonical layout keep at index 0.
    """
    return torch.cat([t[-1:], t[:-1]], dim=0)


def insert_background_box_rows(t: torch.Tensor) -> torch.Tensor:
    """Prepend 4 zero rows (the background's box deltas): (4K, ...) -> (4(K+1), ...)."""
    zeros = torch.zeros((4, *t.shape[1:]), dtype=t.dtype)
    return torch.cat([zeros, t], dim=0)


def ratio_major_order(anchors: torch.Tensor) -> torch.Tensor:
    """Permutation that puts cell anchors in Caffe order: ratio-major, size-minor.

    The order is derived from the anchors themselves (aspect ratio h/w binned to half an
    octave, then area), so it works for any stored anchor order and rounding.

    Args:
        anchors: (A, 4) x1, y1, x2, y2.

    Returns:
        (A,) int64 ``perm`` with ``anchors[perm]`` ratio-major; canonical anchor ``a`` comes
        from source anchor ``perm[a]``.

    Raises:
        WeightsError: the anchors do not form a full ratio x size grid.
    """
    a = anchors.to(torch.float64)
    w, h = a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]
    if bool((w <= 0).any() or (h <= 0).any()):
        raise WeightsError(f"cell anchors must have positive sides; got {anchors.tolist()}")
    ratio_bin = torch.round(torch.log2(h / w) * 2).to(torch.int64)
    area = w * h
    perm = sorted(range(len(a)), key=lambda i: (int(ratio_bin[i]), float(area[i])))
    counts = torch.unique(ratio_bin, return_counts=True)[1]
    if len(set(counts.tolist())) != 1:
        raise WeightsError(
            f"cell anchors do not form a ratio x size grid (anchors per ratio: "
            f"{counts.tolist()}): {anchors.tolist()}"
        )
    return torch.tensor(perm, dtype=torch.int64)


def permute_anchor_channels(t: torch.Tensor, perm: torch.Tensor, group: int) -> torch.Tensor:
    """Reorder per-anchor output channels: channel ``a*G + g`` -> ``perm[a]*G + g``.

    Args:
        t: (A*G, ...) conv weight or bias, channels grouped by anchor.
        perm: (A,) canonical anchor a <- source anchor perm[a].
        group: G, channels per anchor (1 objectness logit, 4 deltas).

    Returns:
        (A*G, ...) with the anchors in canonical order.
    """
    a = perm.numel()
    return t.reshape(a, group, *t.shape[1:])[perm].reshape(t.shape)


def permute_two_way_objectness(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Reorder a 2A-channel objectness laid out ``view(2, A)``: bg block, then fg block.

    Args:
        t: (2A, ...) with channel k*A + a (k = 0 background, 1 foreground).
        perm: (A,) anchor permutation.

    Returns:
        (2A, ...) same blocks, anchors permuted inside each block.
    """
    a = perm.numel()
    return t.reshape(2, a, *t.shape[1:])[:, perm].reshape(t.shape)
