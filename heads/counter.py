"""Zhang, Hare & Prügel-Bennett (ICLR 2018) counting component, as wired into BAN.

Shape glossary:
    B   questions
    K   regions (padded)
    O   objects kept for counting (10)

Inputs are the normalised corners (B, 4, K) and per-region attention logits (B, K); padded
regions must carry a very negative logit (sigmoid -> 0) so ``topk`` never prefers them.
Output is a (B, O+1) soft one-hot of the count times a confidence.
"""

from __future__ import annotations

import torch
from torch import nn


class PiecewiseLinear(nn.Module):
    """A learned monotone map [0, 1] -> [0, 1] with ``n`` equal segments."""

    def __init__(self, n: int = 16) -> None:
        super().__init__()
        self.n = n
        weight = torch.ones(n + 1)
        weight[0] = 0.0
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise on any shape."""
        w = self.weight.abs()
        w = (w / w.sum()).view([self.n + 1] + [1] * x.dim())
        csum = w.cumsum(0).expand((self.n + 1, *x.shape))
        w = w.expand_as(csum)
        y = self.n * x.unsqueeze(0)
        idx = y.long().clamp(min=0)
        frac = y - y.floor()
        out = csum.gather(0, idx.clamp(max=self.n)) + frac * w.gather(
            0, (idx + 1).clamp(max=self.n)
        )
        return out.squeeze(0)


def _outer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    size = (*x.shape, x.shape[-1])
    return x.unsqueeze(-1).expand(size), x.unsqueeze(-2).expand(size)


def _iou(boxes: torch.Tensor) -> torch.Tensor:
    """(B, 4, O) corners -> (B, O, O) IoU."""
    lo = torch.max(boxes[:, None, :2, :, None], boxes[:, None, :2, None, :])  # (B,1,2,O,O)
    hi = torch.min(boxes[:, None, 2:, :, None], boxes[:, None, 2:, None, :])
    wh = (hi - lo).clamp(min=0).squeeze(1)
    inter = wh[:, 0] * wh[:, 1]
    area = (boxes[:, 2] - boxes[:, 0]).clamp(min=0) * (boxes[:, 3] - boxes[:, 1]).clamp(min=0)
    return inter / (area.unsqueeze(2) + area.unsqueeze(1) - inter + 1e-12)


class Counter(nn.Module):
    """Counting from attention weights and box overlaps (``counting.py`` of ban-vqa)."""

    def __init__(self, objects: int = 10) -> None:
        super().__init__()
        self.objects = objects
        self.f = nn.ModuleList([PiecewiseLinear(16) for _ in range(8)])

    def forward(self, boxes: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """boxes (B, 4, K), logits (B, K) -> (B, O+1)."""
        k = min(self.objects, logits.shape[1])
        top, idx = logits.topk(k, dim=1, sorted=False)
        boxes = boxes.gather(2, idx.unsqueeze(1).expand(-1, 4, -1))
        att = torch.sigmoid(top)
        a, b = _outer(att)
        relevancy = a * b
        distance = 1 - _iou(boxes)
        score = self.f[0](relevancy) * self.f[1](distance)
        entry, row = self._deduplicate(self.f[3](relevancy) * self.f[4](distance), att)
        score = score / entry
        correction = self.f[0](att * att) / row
        total = score.sum(dim=(1, 2)).unsqueeze(1) + correction.sum(1, keepdim=True)
        count = (total + 1e-20).sqrt()
        att_conf = (self.f[5](att) - 0.5).abs()
        dist_conf = (self.f[6](distance) - 0.5).abs()
        conf = self.f[7](att_conf.mean(1, keepdim=True) + dist_conf.mean(dim=(1, 2)).unsqueeze(1))
        return self._one_hot(count) * conf

    def _deduplicate(
        self, dedup: torch.Tensor, att: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = _outer(att)
        att_diff = (a - b).abs()
        sa, sb = _outer(dedup)
        score_diff = (sa - sb).abs()
        sim = self.f[2](1 - score_diff).prod(dim=1) * self.f[2](1 - att_diff)
        row = sim.sum(2)
        ra, rb = _outer(row)
        return ra * rb, row

    def _one_hot(self, count: torch.Tensor) -> torch.Tensor:
        """Linear interpolation between the two nearest integers, (B, 1) -> (B, O+1)."""
        count = count.clamp(0, self.objects)
        i = count.detach().long()
        frac = count - i.to(count.dtype)
        left = torch.zeros(count.shape[0], self.objects + 1, device=count.device)
        right = torch.zeros_like(left)
        left.scatter_(1, i.clamp(max=self.objects), 1.0)
        right.scatter_(1, (i + 1).clamp(max=self.objects), 1.0)
        return (1 - frac) * left + frac * right
