"""Losses and evaluation helpers: caption XE (+ doubly stochastic), SCST, VQA BCE, predictions.

Shape glossary:
    B   examples in the batch,  K   regions,  T   caption steps,  V   vocabulary,
    N   candidate answers,  W   beams
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from butd.heads.data import CaptionExamples, VQAExamples
from butd.heads.decoding import Captioner, strip_tokens
from butd.heads.metrics.captions import CiderD
from butd.heads.regions import RegionBatch, RegionSource
from butd.heads.vocab import PAD, Vocabulary, pad_captions
from butd.heads.vqa import vqa_bce_loss


def doubly_stochastic_penalty(
    alphas: torch.Tensor, mask: torch.Tensor, steps: torch.Tensor
) -> torch.Tensor:
    """λ-free SAT penalty Σ_i (1 − Σ_t α_ti)² over real regions, mean over the batch.

    Args:
        alphas: (B, T, K) attention weights; steps: (B, T) bool, True on real time steps.
        mask: (B, K) real regions.
    """
    coverage = (alphas * steps.unsqueeze(-1).to(alphas.dtype)).sum(1)  # (B, K)
    return (((1.0 - coverage) ** 2) * mask.to(alphas.dtype)).sum(1).mean()


def caption_xe_loss(
    model: Captioner,
    regions: RegionBatch,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    ds_lambda: float = 0.0,
) -> torch.Tensor:
    """Token-mean cross-entropy (ignoring <pad>) plus λ × the doubly stochastic penalty.

    Xu et al. add λ × penalty to the caption's SUMMED negative log-likelihood (arctic
    ``capgen.py``: per-sentence cost, α_c = 1). The cross-entropy here is a token mean, so the
    penalty is divided by the mean caption length to keep the paper's ratio; without that it was
    ~T times too strong and spread attention evenly over the regions instead of binding.
    """
    out = model(regions, inputs)
    loss = nn.functional.cross_entropy(
        out.logits.flatten(0, 1), targets.flatten(), ignore_index=PAD
    )
    if ds_lambda > 0:
        steps = targets != PAD  # (B, T)
        tokens_per_caption = steps.sum(1).float().mean().clamp(min=1.0)
        penalty = doubly_stochastic_penalty(out.alphas, regions.mask, steps)
        loss = loss + ds_lambda * penalty / tokens_per_caption
    return loss


def scst_loss(
    model: Captioner,
    regions: RegionBatch,
    references: Sequence[Sequence[str]],
    cider: CiderD,
    vocab: Vocabulary,
    beam_size: int = 5,
    max_len: int = 20,
) -> tuple[torch.Tensor, float]:
    """Anderson's SCST: the W beam captions weighted by (CIDEr-D − mean CIDEr-D of the beam).

    ``references`` are tokenised strings per image; ``cider`` holds train-set document
    frequencies. Returns the loss and the mean reward.
    """
    model.eval()
    beams = model.beam_search(regions, beam_size, max_len).tokens  # (B, W, T)
    model.train()
    b, w, _ = beams.shape
    seqs = strip_tokens(beams.flatten(0, 1))
    rewards = torch.tensor(
        [cider.score(" ".join(vocab.decode(s)), references[i // w]) for i, s in enumerate(seqs)]
    ).view(b, w)
    device = regions.features.device
    advantage = (rewards - rewards.mean(1, keepdim=True)).view(-1).to(device)
    inputs, targets = (torch.tensor(x, device=device) for x in pad_captions(seqs, max_len + 1))
    rows = torch.arange(b).repeat_interleave(w)
    out = model(regions.select(rows), inputs)
    logp = torch.log_softmax(out.logits, -1).gather(2, targets.unsqueeze(-1)).squeeze(-1)
    logp = (logp * (targets != PAD)).sum(1)
    return -(advantage * logp).mean(), float(rewards.mean())


def vqa_loss(
    model: nn.Module, regions: RegionSource, ex: VQAExamples, idx: torch.Tensor
) -> torch.Tensor:
    """BCE × N on the soft scores of questions ``idx``."""
    idx = idx.to(ex.questions.device)
    out = model(regions.select(ex.image_rows[idx]), ex.questions[idx])
    return vqa_bce_loss(out.logits, ex.targets(idx))


@torch.no_grad()
def vqa_predict(
    model: nn.Module,
    regions: RegionBatch,
    ex: VQAExamples,
    answers: Sequence[str],
    batch: int = 256,
) -> tuple[list[str], torch.Tensor]:
    """Argmax answers and the attention of every question (eval mode)."""
    model.eval()
    preds, atts = [], []
    for s in range(0, len(ex), batch):
        idx = torch.arange(s, min(s + batch, len(ex)), device=ex.questions.device)
        out = model(regions.select(ex.image_rows[idx]), ex.questions[idx])
        preds += [answers[i] for i in out.logits.argmax(1).tolist()]
        att = out.attention
        atts.append(att if att.dim() == 2 else att.sum(dim=(1, 3)))  # BAN: (B, G, K, L) -> (B, K)
    k = max(a.shape[1] for a in atts)
    return preds, torch.cat([nn.functional.pad(a, (0, k - a.shape[1])) for a in atts])


@torch.no_grad()
def caption_decode(
    model: Captioner,
    regions: RegionBatch,
    rows: Sequence[int],
    vocab: Vocabulary,
    beam_size: int = 1,
    max_len: int = 20,
    batch: int = 100,
    allowed_multiple: Sequence[int] | None = None,
) -> list[str]:
    """Captions of images ``rows``: greedy when ``beam_size`` is 1, else beam search."""
    model.eval()
    out: list[str] = []
    for s in range(0, len(rows), batch):
        sub = regions.select(list(rows[s : s + batch]))
        if beam_size == 1 and allowed_multiple is None:
            tokens = model.sample(sub, max_len, greedy=True)[0]
        else:
            tokens = model.beam_search(sub, beam_size, max_len, allowed_multiple).tokens[:, 0]
        out += [" ".join(vocab.decode(t)) for t in strip_tokens(tokens)]
    return out


def caption_batch_loss(
    model: Captioner,
    regions: RegionSource,
    ex: CaptionExamples,
    idx: torch.Tensor,
    ds_lambda: float = 0.0,
) -> torch.Tensor:
    """XE loss of caption examples ``idx``."""
    idx = idx.to(ex.inputs.device)
    t = int((ex.targets[idx] != PAD).sum(1).max())
    return caption_xe_loss(
        model,
        regions.select(ex.image_rows[idx]),
        ex.inputs[idx, :t],
        ex.targets[idx, :t],
        ds_lambda,
    )
