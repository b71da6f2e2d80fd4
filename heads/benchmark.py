"""The synthetic learning benchmark (heads-reference §10): tasks, controls and scores.

Shape glossary:
    S   scenes,  K   regions (10..16),  D   feature size,  Q   questions
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import torch

from butd.heads.ban import BAN, BANConfig
from butd.heads.captioners import AdaptiveCore, CaptionerConfig
from butd.heads.data import (
    CaptionExamples,
    CaptionItem,
    VQAExamples,
    VQAItem,
    caption_examples,
    vqa_examples,
)
from butd.heads.decoding import Captioner
from butd.heads.metrics.captions import bleu, cider_d
from butd.heads.metrics.vqa_accuracy import vqa_accuracy
from butd.heads.objectives import caption_batch_loss, caption_decode, vqa_loss, vqa_predict
from butd.heads.regions import RegionBatch, collate_records
from butd.heads.synth import (
    COLORS,
    GRID,
    SHAPES,
    Scene,
    SynthWorld,
    content_f1,
    make_questions,
    make_scenes,
    parse_pairs,
    scene_captions,
    scene_pairs,
)
from butd.heads.train import TrainSettings, fit
from butd.heads.vocab import PAD, Vocabulary, tokenize_caption, tokenize_question
from butd.heads.vqa import UpDownVQA, VQAConfig

logger = logging.getLogger(__name__)
VQA_HEADS = ("blind", "mean_pool", "updown", "updown_relu", "ban2", "ban2_counter")
CAPTION_HEADS = (
    "blind", "mean_pool", "updown", "sat", "adaptive", "adaptive_spatial", "adaptive_warmup",
)  # fmt: skip
# Heads over grid features (``--grid``): SCA-CNN, its spatial-only ablation, CBAM in front.
GRID_CAPTION_HEADS = (
    "blind", "mean_pool", "updown", "updown_cbam", "sca", "sca_nochannel", "sca_cbam",
)  # fmt: skip
GRID_VQA_HEADS = ("blind", "mean_pool", "updown", "updown_cbam")


@dataclass(frozen=True)
class VQATask:
    """Train/val regions and questions of the simulated VQA task."""

    train_regions: RegionBatch
    train: VQAExamples
    val_regions: RegionBatch
    val: VQAExamples
    val_scenes: list[Scene]
    vocab: Vocabulary
    answers: list[str]
    grid_size: int = 0  # G when the features are G*G grid cells (butd.heads.synth.grid_scene)


def _regions(scenes: list[Scene], l2: bool) -> tuple[RegionBatch, dict[str, int]]:
    regions = collate_records([s.record for s in scenes], l2_normalise=l2)
    return regions, {s.record.image_id: i for i, s in enumerate(scenes)}


def _vqa_items(scenes: list[Scene], seed: int) -> list[VQAItem]:
    qs = make_questions(scenes, seed)
    return [
        VQAItem(
            i,
            scenes[q.scene].record.image_id,
            q.text,
            q.human_answers,
            q.qtype,
            f"{q.qtype}:{q.target_object}",
        )
        for i, q in enumerate(qs)
    ]


def vqa_task(
    dim: int, n_train: int, n_val: int, seed: int = 0, l2: bool = False, grid: bool = False
) -> VQATask:
    """Scenes with 1–6 objects; ``l2`` L2-normalises the features (Teney et al.); ``grid``
    renders them as GRID x GRID grid maps."""
    world = SynthWorld(dim, seed)
    tr = make_scenes(world, n_train, seed + 1, grid=grid)
    va = make_scenes(world, n_val, seed + 2, grid=grid)
    tr_items, va_items = _vqa_items(tr, seed + 3), _vqa_items(va, seed + 4)
    vocab = Vocabulary.build((tokenize_question(it.question) for it in tr_items), min_count=1)
    answers = sorted({a for it in tr_items for a in it.answers})
    (tr_r, tr_rows), (va_r, va_rows) = _regions(tr, l2), _regions(va, l2)
    return VQATask(
        tr_r, vqa_examples(tr_items, tr_rows, vocab, answers), va_r,
        vqa_examples(va_items, va_rows, vocab, answers), va, vocab, answers, GRID if grid else 0,
    )  # fmt: skip


def vqa_model(name: str, task: VQATask, hidden: int) -> torch.nn.Module:
    """A head of ``VQA_HEADS`` sized for CPU."""
    d, v, n = task.train_regions.features.shape[2], len(task.vocab), len(task.answers)
    if name.startswith("ban2"):
        cfg = BANConfig(d, 100, hidden, glimpses=2, counter=name.endswith("counter"))
        return BAN(v, n, cfg)
    variant = "hengyuan" if name == "updown_relu" else "paper"
    attention = "mean" if name == "mean_pool" else "top_down"
    cfg = VQAConfig(variant, attention, d, 100, hidden, hidden, grid_size=task.grid_size)
    return UpDownVQA(v, n, replace(cfg, cbam=name.endswith("_cbam")))


def run_vqa(
    name: str,
    task: VQATask,
    steps: int,
    hidden: int = 256,
    batch: int = 128,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one head and score it: official accuracy per question type, attention hit rate."""
    torch.manual_seed(seed)
    model = vqa_model(name, task, hidden).to(device)
    train_r, val_r = task.train_regions.to(device), task.val_regions.to(device)
    if name == "blind":
        train_r, val_r = train_r.zeroed(), val_r.zeroed()
    train = task.train.to(device)
    settings = TrainSettings("adam", steps, batch, 1e-3, seed=seed)
    fit(
        model,
        lambda idx: vqa_loss(model, train_r, train, idx),
        len(train),
        settings,
        progress=False,
    )
    preds, att = vqa_predict(model, val_r, task.val.to(device), task.answers)
    by_type: dict[str, list[float]] = {}
    for p, it in zip(preds, task.val.items, strict=True):
        by_type.setdefault(it.answer_type, []).append(vqa_accuracy(p, it.answers))
    row = {t: 100 * sum(v) / len(v) for t, v in by_type.items()}
    row["overall"] = 100 * sum(sum(v) for v in by_type.values()) / len(preds)
    row["att_hit"] = attention_hit_rate(att.cpu(), task)
    return row


def attention_hit_rate(att: torch.Tensor, task: VQATask) -> float:
    """% of colour questions whose argmax region shows the asked object (or its duplicate)."""
    hits = total = 0
    for r, it in enumerate(task.val.items):
        if it.answer_type != "color":
            continue
        target = int(it.question_type.split(":")[1])
        owner = task.val_scenes[int(task.val.image_rows[r])].record.extra["object"]
        hits += int(owner[int(att[r].argmax())] == target)
        total += 1
    return 100.0 * hits / max(total, 1)


@dataclass(frozen=True)
class CaptionTask:
    """Train/val regions and captions of the simulated caption task."""

    train_regions: RegionBatch
    train: CaptionExamples
    val_regions: RegionBatch
    val_scenes: list[Scene]
    val_refs: dict[str, list[str]]
    vocab: Vocabulary
    val: CaptionExamples  # the val references as teacher-forcing examples (diagnostics)
    grid_size: int = 0  # G when the features are G*G grid cells (butd.heads.synth.grid_scene)


def caption_task(
    dim: int, n_train: int, n_val: int, seed: int = 0, grid: bool = False
) -> CaptionTask:
    """Scenes with 1–4 objects and 5 templated references each (raw, un-normalised features);
    ``grid`` renders them as GRID x GRID grid maps."""
    world = SynthWorld(dim, seed)
    tr = make_scenes(world, n_train, seed + 1, 1, 4, grid=grid)
    va = make_scenes(world, n_val, seed + 2, 1, 4, grid=grid)
    rng = random.Random(seed)
    items = [CaptionItem(s.record.image_id, tuple(scene_captions(s, rng))) for s in tr]
    vocab = Vocabulary.build(
        (tokenize_caption(c, keep_commas=True) for it in items for c in it.captions), 1
    )
    (tr_r, rows), (va_r, va_rows) = _regions(tr, False), _regions(va, False)
    va_items = [CaptionItem(s.record.image_id, tuple(scene_captions(s, rng))) for s in va]
    refs = {
        str(i): [" ".join(tokenize_caption(c)) for c in it.captions]
        for i, it in enumerate(va_items)
    }
    ex = caption_examples(items, rows, vocab, max_len=24, keep_commas=True)
    va_ex = caption_examples(va_items, va_rows, vocab, max_len=24, keep_commas=True)
    return CaptionTask(tr_r, ex, va_r, va, refs, vocab, va_ex, GRID if grid else 0)


def caption_model(name: str, task: CaptionTask, hidden: int) -> Captioner:
    """A captioner of ``CAPTION_HEADS`` sized for CPU (att hidden = hidden / 2).

    ``adaptive_spatial`` is adaptive attention without the visual sentinel (Lu et al.'s
    "spatial attention" ablation); ``adaptive_warmup`` trains the first half of the updates
    without the sentinel, then with it (``run_caption``); ``sat_nopenalty`` is SAT with λ = 0.
    """
    kind = name.split("_")[0] if name.startswith(("sat", "adaptive", "sca")) else "updown"
    attention = "uniform" if name == "mean_pool" else "additive"
    d = task.train_regions.features.shape[2]
    cfg = CaptionerConfig(kind, attention, d, hidden, hidden // 2, hidden, init_std=0.0)
    cfg = replace(
        cfg,
        sentinel=name != "adaptive_spatial",
        grid_size=task.grid_size,
        cbam=name.endswith("_cbam"),
        channel_attention=name != "sca_nochannel",
    )
    return Captioner(len(task.vocab), cfg)


def run_caption(
    name: str,
    task: CaptionTask,
    steps: int,
    hidden: int = 256,
    batch: int = 100,
    seed: int = 0,
    lr: float = 1e-3,
    device: str = "cpu",
) -> dict[str, Any]:
    """Train one captioner (XE); score greedy captions: content-F1, exact-set, BLEU-4, CIDEr-D."""
    torch.manual_seed(seed)
    model = caption_model(name, task, hidden).to(device)
    train_r, val_r = task.train_regions.to(device), task.val_regions.to(device)
    if name == "blind":
        train_r, val_r = train_r.zeroed(), val_r.zeroed()
    train = task.train.to(device)
    lam = 1.0 if name == "sat" else 0.0
    warmup = steps // 2 if name == "adaptive_warmup" else 0
    for phase_steps, sentinel in ((warmup, False), (steps - warmup, True)):
        if phase_steps == 0:
            continue
        if isinstance(model.core, AdaptiveCore):
            model.core.use_sentinel = sentinel and name != "adaptive_spatial"
        fit(
            model,
            lambda idx: caption_batch_loss(model, train_r, train, idx, lam),
            len(train),
            TrainSettings("adam", phase_steps, batch, lr, seed=seed),
            progress=False,
        )
    caps = caption_decode(model, val_r, list(range(len(task.val_scenes))), task.vocab, max_len=24)
    return {**caption_scores(caps, task), **caption_diagnostics(model, val_r, task)}


def region_words(task: CaptionTask) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, K) vocabulary ids of each val region's colour word and shape word; -1 on clutter
    and padding (K = the padded region count of ``task.val_regions``)."""
    k = task.val_regions.features.shape[1]
    colour = torch.full((len(task.val_scenes), k), -1, dtype=torch.long)
    shape = torch.full_like(colour, -1)
    index = task.vocab.index
    for row, scene in enumerate(task.val_scenes):
        rec = scene.record
        real = torch.tensor(rec.extra["object"]) >= 0
        n = len(real)
        colour_ids = torch.tensor([index.get(COLORS[c], -1) for c in rec.attrs_id.tolist()])
        shape_ids = torch.tensor(
            [index.get(SHAPES[c], -1) if c < len(SHAPES) else -1 for c in rec.objects_id]
        )
        colour[row, :n] = torch.where(real, colour_ids, -1)
        shape[row, :n] = torch.where(real, shape_ids, -1)
    return colour, shape


@torch.no_grad()
def caption_diagnostics(
    model: Captioner, regions: RegionBatch, task: CaptionTask
) -> dict[str, float]:
    """Where a captioner looks, teacher-forced on the val references.

    ``att_named``: % of colour and shape target words whose argmax region under α_t (the
    weights used to predict that word) shows an object of that colour or shape: the caption
    counterpart of the VQA ``att_hit``. ``beta_content`` / ``beta_function``: mean β_t (%) on
    colour/shape words and on every other word, for decoders with a gate. Adaptive attention:
    the sentinel weight, so LOW means looking (Lu et al.'s diagnostic: high on function words,
    low where the decoder must look). Show-Attend-Tell: the selector gate on the context, so
    HIGH means looking. Absent for Up-Down.
    """
    model.eval()
    device = regions.features.device
    colour, shape = (t.to(device) for t in region_words(task))
    val = task.val.to(device)
    content = torch.tensor(task.vocab.ids_of((*COLORS, *SHAPES)), device=device)
    hits = named = 0.0
    beta_sum, beta_n = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    has_beta = False
    for s in range(0, len(val), 200):
        idx = torch.arange(s, min(s + 200, len(val)), device=device)
        rows = val.image_rows[idx]
        out = model(regions.select(rows), val.inputs[idx])
        targets = val.targets[idx]  # (B, T)
        is_content = torch.isin(targets, content)
        look = out.alphas.argmax(-1)  # (B, T) region of each step
        seen_colour = colour[rows].gather(1, look)
        seen_shape = shape[rows].gather(1, look)
        hit = (seen_colour == targets) | (seen_shape == targets)
        hits += float(hit[is_content].sum())
        named += float(is_content.sum())
        if out.betas is not None:
            has_beta = True
            for k, sel in enumerate((is_content, (targets != PAD) & ~is_content)):
                beta_sum[k] += out.betas[sel].double().sum()
                beta_n[k] += sel.sum()
    result = {"att_named": 100.0 * hits / max(named, 1.0)}
    if has_beta:
        beta = (100 * beta_sum / beta_n.clamp(min=1)).tolist()
        result |= {"beta_content": beta[0], "beta_function": beta[1]}
    return result


def caption_scores(caps: list[str], task: CaptionTask) -> dict[str, Any]:
    """Content-F1 / exact-set on (colour, shape) pairs, BLEU-4 and CIDEr-D (×100)."""
    f1s, exact = [], []
    for cap, scene in zip(caps, task.val_scenes, strict=True):
        pred, truth = parse_pairs(cap.split()), scene_pairs(scene)
        f1s.append(content_f1(pred, truth))
        exact.append(float(pred == truth))
    res = {str(i): " ".join(tokenize_caption(c)) for i, c in enumerate(caps)}
    return {
        "content_f1": 100 * sum(f1s) / len(f1s),
        "exact_set": 100 * sum(exact) / len(exact),
        "BLEU-4": 100 * bleu(task.val_refs, res)[3],
        "CIDEr-D": 100 * cider_d(task.val_refs, res)[0],
        "example": caps[0],
    }


def constant_caption_f1(task: CaptionTask) -> float:
    """Content-F1 of the single best constant pair caption (calibration)."""
    best = Counter(p for s in task.val_scenes for p in scene_pairs(s)).most_common(1)[0][0]
    pred = Counter([best])
    return (
        100 * sum(content_f1(pred, scene_pairs(s)) for s in task.val_scenes) / len(task.val_scenes)
    )
