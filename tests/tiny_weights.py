"""A narrow detector with seeded random weights, saved as a canonical weights file.

Tests of the extractor, the worker and the gateway use it: same code path as the full
ResNet-101 model, fast on CPU. Random weights give arbitrary but deterministic regions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from butd.detector.anchors import caffe_cell_anchors
from butd.detector.config import Conventions, ModelSpec, tiny_arch
from butd.detector.model import Detector

# Small input scale so one image costs milliseconds on CPU.
TINY_EXTRACTION = {"min_size": 96, "max_size": 160, "min_boxes": 4, "max_boxes": 12}


def tiny_spec(conventions: Conventions | None = None) -> ModelSpec:
    arch = tiny_arch()
    return ModelSpec(
        arch=arch,
        conventions=conventions or Conventions(),
        objects_vocab=tuple(f"object{i}" for i in range(arch.num_classes)),
        attributes_vocab=tuple(f"attribute{i}" for i in range(arch.num_attributes)),
        description="tiny random test model (not trained)",
        extraction_defaults=dict(TINY_EXTRACTION),
    )


def random_detector(spec: ModelSpec | None = None, seed: int = 0) -> Detector:
    """Detector with seeded random weights and plausible frozen-BN statistics."""
    spec = spec or tiny_spec()
    torch.manual_seed(seed)
    model = Detector(spec)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=gen) * 1.5 + 0.5)
            elif name.endswith("running_mean"):
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
            elif ".bn" in name or "shortcut_bn" in name:
                if name.endswith("weight"):
                    tensor.copy_(torch.rand(tensor.shape, generator=gen) + 0.5)
                else:
                    tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.1)
        model.rpn.cell_anchors.copy_(caffe_cell_anchors())
        # Spread the classifier so some regions pass the 0.2 confidence threshold.
        model.roi_heads.cls_score.weight.mul_(20.0)
    return model.eval()


def make_tiny_weights(path: Path, seed: int = 0) -> Path:
    """Write a canonical weights file of the tiny random model; returns ``path``."""
    from butd.detector.weights import save_canonical

    model = random_detector(seed=seed)
    save_canonical(
        path,
        model.state_dict(),
        model.spec,
        source_sha256="0" * 64,
        source_format="tiny-random-test",
    )
    return path
