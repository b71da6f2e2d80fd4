"""Stand-ins for the device work, used only by the benchmarks (``bench/pipeline.py``).

* ``StandInNetwork`` replaces the network: ``propose`` and ``regions_mixed`` return what the
  full ResNet-101 model returns for an image (300 proposals inside the image, 2048-d features,
  1601 class and 401 attribute logits) from fixed tables, so the network costs nothing and
  everything around it (decode, the exact resize, the selection rule, records, shards, Redis)
  runs for real. The class logits are detector-like: each proposal has one dominant class among
  a few dozen, so the selection solves a few dozen classes as on real detections.
* ``HostOnlyExtractor`` also stands in for what a GPU worker runs *on the device* besides the
  network (the float64 resize and the selection): what is left is the host's share of a GPU
  worker (read, hash, decode, staging, batching, gathering, host copies, records, seal, index,
  Redis), whose ceiling is the most a GPU worker can sustain whatever the GPU.

Neither is a model: their regions are meaningless. Real outputs come from ``Detector``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from butd.detector.config import ExtractionConfig, ModelSpec
from butd.detector.extractor import Extractor, Staged, _Kept
from butd.detector.model import RegionOutputs
from butd.detector.preprocess import PreparedImage, compute_scale, resized_shape

PROPOSALS = 300  # Caffe TEST.RPN_POST_NMS_TOP_N
OBJECT_KINDS = 40  # dominant classes drawn from this many (a photo holds a few dozen kinds)


def full_spec() -> ModelSpec:
    """The published model's shape: 1600 classes, 400 attributes, 2048-d features."""
    return ModelSpec(
        objects_vocab=tuple(f"object{i}" for i in range(1600)),
        attributes_vocab=tuple(f"attribute{i}" for i in range(400)),
        description="stand-in network (benchmark only: outputs are fixed tables)",
    )


class StandInNetwork(nn.Module):
    """``Detector``'s ``propose`` / ``regions_mixed`` at no cost, full-size outputs.

    Args:
        spec: the model shape to imitate (``full_spec()``).
        seed: seeds the tables.
    """

    def __init__(self, spec: ModelSpec | None = None, seed: int = 0) -> None:
        super().__init__()
        self.spec = spec or full_spec()
        arch = self.spec.arch
        g = torch.Generator().manual_seed(seed)
        xy = torch.rand(PROPOSALS, 2, generator=g) * 0.8
        wh = torch.rand(PROPOSALS, 2, generator=g) * 0.4 + 0.02
        self.register_buffer("unit_boxes", torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1))
        self.register_buffer(
            "features", torch.rand(PROPOSALS, arch.feature_dim, generator=g).relu()
        )
        logits = torch.randn(PROPOSALS, arch.num_classes + 1, generator=g)
        kinds = torch.randint(1, arch.num_classes + 1, (OBJECT_KINDS,), generator=g)
        dominant = kinds[torch.randint(0, OBJECT_KINDS, (PROPOSALS,), generator=g)]
        logits[torch.arange(PROPOSALS), dominant] += 4.0 + 6.0 * torch.rand(PROPOSALS, generator=g)
        self.register_buffer("cls_logits", logits)
        attrs = torch.randn(PROPOSALS, arch.num_attributes + 1, generator=g)
        self.register_buffer("attr_logits", attrs)

    def propose(
        self, images: torch.Tensor, scales: list[float], config: ExtractionConfig
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """No res4 (an empty map) and the fixed proposals scaled into each (H, W) image."""
        b, _, h, w = images.shape
        size = torch.tensor([w - 1, h - 1, w - 1, h - 1], dtype=torch.float32)
        boxes = self.unit_boxes * size.to(self.unit_boxes.device)
        return torch.zeros((b, 1, 1, 1), device=boxes.device), [boxes] * b

    def regions_mixed(
        self, maps: Sequence[tuple[torch.Tensor, list[torch.Tensor]]]
    ) -> list[list[RegionOutputs]]:
        """The fixed features and logits for every proposal set."""
        return [
            [RegionOutputs(b, self.features, self.cls_logits, self.attr_logits) for b in boxes]
            for _, boxes in maps
        ]


def standin_extractor(device: str = "cpu", batch_size: int = 8, **config: object) -> Extractor:
    """An ``Extractor`` around ``StandInNetwork`` (prepare and selection run for real)."""
    net = StandInNetwork()
    cfg = ExtractionConfig().replace(**config)
    return Extractor(
        net,  # type: ignore[arg-type]  (duck-typed: propose, regions_mixed, spec)
        config=cfg,
        weights_sha256="standin" + "0" * 57,
        device=device,
        batch_size=batch_size,
    )


class HostOnlyExtractor(Extractor):
    """``StandInNetwork`` whose device-side preparation and selection cost nothing too.

    ``stage`` keeps the decoded pixels (a GPU worker pins them: one memcpy); prepared images
    and their batches are shape-only ("meta") tensors (the GPU resizes and stacks them);
    ``_select`` keeps a fixed 10..100 regions per image with the class probabilities computed
    once (the GPU selects). Grouping, gathering, the host copy and the records are the real
    code.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._cls_prob = self.model.cls_logits.softmax(dim=1)

    def stage(self, image: np.ndarray, config: ExtractionConfig | None = None) -> Staged:
        return torch.from_numpy(np.ascontiguousarray(image))

    def _prepare(self, image: np.ndarray | Staged, config: ExtractionConfig) -> PreparedImage:
        h, w = int(image.shape[0]), int(image.shape[1])
        scale = compute_scale(h, w, config.min_size, config.max_size)
        tensor = torch.empty((3, *resized_shape(h, w, scale)), device="meta")
        return PreparedImage(tensor=tensor, scale=scale, orig_h=h, orig_w=w)

    def _images(self, group: list[PreparedImage]) -> torch.Tensor:
        return torch.empty((len(group), *group[0].tensor.shape), device="meta")

    def _select(self, out: RegionOutputs, scale: float, config: ExtractionConfig) -> _Kept:
        s = torch.tensor(scale, dtype=torch.float32)
        n = 10 + (int(out.boxes[0, 2]) * 31) % 91  # 10..100 regions, varying with the shape
        index = torch.arange(min(n, out.boxes.shape[0]))
        return self._gather(out, index, s, cls_prob=self._cls_prob, boxes=out.boxes / s)


def host_only_extractor(batch_size: int = 8) -> HostOnlyExtractor:
    """A ``HostOnlyExtractor`` on the CPU."""
    return HostOnlyExtractor(
        StandInNetwork(),  # type: ignore[arg-type]
        config=ExtractionConfig(),
        weights_sha256="hostonly" + "0" * 56,
        device="cpu",
        batch_size=batch_size,
    )
