"""The one decoder loop shared by every captioner: teacher forcing, sampling, beam search.

Shape glossary:
    B   images
    W   beams per image
    K   regions (padded)
    T   caption length (incl. <eos>)
    V   vocabulary size

``Captioner`` wraps a decoder core (``butd.heads.captioners``); the loop never knows which attention
module the core holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from butd.heads.captioners import Cache, CaptionerConfig, DecoderCore, State, build_core
from butd.heads.regions import RegionBatch
from butd.heads.vocab import BOS, EOS, PAD, UNK


@dataclass(frozen=True)
class TeacherForcing:
    """logits (B, T, V), alphas (B, T, K), betas (B, T) or None."""

    logits: torch.Tensor
    alphas: torch.Tensor
    betas: torch.Tensor | None


@dataclass(frozen=True)
class Decoded:
    """tokens (B, W, T) right-padded with <pad>, log_probs (B, W) raw sums, best first."""

    tokens: torch.Tensor
    log_probs: torch.Tensor


class Captioner(nn.Module):
    """A caption model = a decoder core + the shared loop."""

    def __init__(self, vocab_size: int, config: CaptionerConfig) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = vocab_size
        self.core: DecoderCore = build_core(vocab_size, config)
        self.add_module("core", cast(nn.Module, self.core))

    def forward(self, regions: RegionBatch, inputs: torch.Tensor) -> TeacherForcing:
        """Teacher forcing: inputs (B, T) start with <bos>; returns per-step outputs."""
        state, cache = self.core.start(regions.features, regions.mask)
        logits, alphas, betas = [], [], []
        for t in range(inputs.shape[1]):
            out = self.core.step(inputs[:, t], state, cache)
            state = out.state
            logits.append(out.logits)
            alphas.append(out.alpha)
            if out.beta is not None:
                betas.append(out.beta)
        return TeacherForcing(
            torch.stack(logits, 1), torch.stack(alphas, 1), torch.stack(betas, 1) if betas else None
        )

    def sample(
        self, regions: RegionBatch, max_len: int = 20, *, greedy: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy (argmax) or multinomial decoding.

        Returns:
            tokens (B, T) right-padded with <pad> after <eos>, and the per-token log-probs (B, T)
            (0 on padding), differentiable when called with gradients enabled.
        """
        state, cache = self.core.start(regions.features, regions.mask)
        b = len(regions)
        tok = regions.features.new_full((b,), BOS, dtype=torch.long)
        done = torch.zeros(b, dtype=torch.bool, device=tok.device)
        tokens, logps = [], []
        for _ in range(max_len):
            out = self.core.step(tok, state, cache)
            state = out.state
            logp = torch.log_softmax(_forbid(out.logits), dim=-1)
            tok = logp.argmax(-1) if greedy else torch.multinomial(logp.exp(), 1).squeeze(1)
            tok = tok.masked_fill(done, PAD)
            tokens.append(tok)
            logps.append(logp.gather(1, tok[:, None]).squeeze(1).masked_fill(done, 0.0))
            done = done | (tok == EOS)
            if bool(done.all()):
                break
        return torch.stack(tokens, 1), torch.stack(logps, 1)

    @torch.no_grad()
    def beam_search(
        self,
        regions: RegionBatch,
        beam_size: int = 5,
        max_len: int = 20,
        allowed_multiple: Sequence[int] | None = None,
    ) -> Decoded:
        """Beam search on raw summed log-probs (Caffe), best beam first.

        Args:
            allowed_multiple: if given, Anderson's repetition constraint: a word already in a
                beam may be emitted again only if it is in this list (the stop-words).
        """
        b, w, v = len(regions), beam_size, self.vocab_size
        state, cache = self.core.start(regions.features, regions.mask)
        state, cache = _tile(state, cache, w)
        device = regions.features.device
        scores = torch.full((b, w), float("-inf"), device=device)
        scores[:, 0] = 0.0  # only the first beam is alive at t = 0
        seqs = torch.zeros(b, w, 0, dtype=torch.long, device=device)
        done = torch.zeros(b, w, dtype=torch.bool, device=device)
        used = torch.zeros(b, w, v, dtype=torch.bool, device=device)
        repeatable = torch.zeros(v, dtype=torch.bool, device=device)
        if allowed_multiple is not None:
            repeatable[list(allowed_multiple)] = True
            repeatable[EOS] = True
        tok = torch.full((b * w,), BOS, dtype=torch.long, device=device)
        for _ in range(max_len):
            out = self.core.step(tok, state, cache)
            logp = torch.log_softmax(_forbid(out.logits), -1).view(b, w, v)
            if allowed_multiple is not None:
                logp = logp.masked_fill(used & ~repeatable, float("-inf"))
            logp = _freeze_finished(logp, done)
            top, idx = (scores.unsqueeze(-1) + logp).view(b, w * v).topk(w, dim=1)
            beam, word = idx // v, idx % v  # (B, W)
            flat = (beam + torch.arange(b, device=device).unsqueeze(1) * w).view(-1)
            state = tuple(s[flat] for s in out.state)
            seqs = torch.cat([seqs.gather(1, beam[..., None].expand_as(seqs)), word[..., None]], 2)
            used = used.gather(1, beam[..., None].expand_as(used)).scatter(2, word[..., None], True)
            done = done.gather(1, beam) | (word == EOS)
            scores, tok = top, word.view(-1)
            if bool(done.all()):
                break
        return Decoded(seqs, scores)


def _forbid(logits: torch.Tensor) -> torch.Tensor:
    """Never emit <pad>, <bos> or <unk> (Caffe's ignore label is UNK)."""
    return logits.index_fill(-1, torch.tensor([PAD, BOS, UNK], device=logits.device), -1e9)


def _freeze_finished(logp: torch.Tensor, done: torch.Tensor) -> torch.Tensor:
    """Finished beams may only append <pad> at zero cost, so their score carries over."""
    frozen = torch.full_like(logp, float("-inf"))
    frozen[..., PAD] = 0.0
    return torch.where(done.unsqueeze(-1), frozen, logp)


def _tile(state: State, cache: Cache, w: int) -> tuple[State, Cache]:
    """Repeat every (B, ...) tensor W times along the batch: image i -> rows i*W .. i*W+W-1."""
    state = tuple(s.repeat_interleave(w, 0) for s in state)
    return state, {k: t.repeat_interleave(w, 0) for k, t in cache.items()}


def strip_tokens(tokens: torch.Tensor) -> list[list[int]]:
    """(B, T) -> word ids up to (excluding) the first <eos>."""
    out = []
    for row in tokens.tolist():
        seq = []
        for t in row:
            if t in (EOS, PAD):
                break
            seq.append(t)
        out.append(seq)
    return out
