"""CUDA paths (skipped without a GPU): fp32 on CUDA equals CPU; fp16/bf16 stay close."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from butd.detector.extractor import Extractor
from tests.tiny_weights import random_detector

pytestmark = pytest.mark.gpu


def _extractor(device: str, precision: str = "fp32") -> Extractor:
    model = random_detector(seed=5)
    config = model.spec.default_extraction().replace(precision=precision)
    return Extractor(model, config=config, weights_sha256="g" * 64, device=device)


def _image() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut()[::3, ::3, ::-1])


def test_fp32_cuda_matches_cpu_and_disables_tf32() -> None:
    cpu = _extractor("cpu").extract([_image()], ["a"])[0]
    gpu_ext = _extractor("cuda")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    gpu = gpu_ext.extract([_image()], ["a"])[0]
    assert gpu.num_boxes == cpu.num_boxes
    np.testing.assert_allclose(gpu.boxes, cpu.boxes, atol=1e-2)
    np.testing.assert_allclose(gpu.features, cpu.features, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_regions_close_to_fp32(precision: str) -> None:
    ref = _extractor("cuda").extract([_image()], ["a"])[0]
    fast = _extractor("cuda", precision).extract([_image()], ["a"])[0]
    assert fast.features.dtype == np.float32 and np.isfinite(fast.features).all()
    # Regions may differ near thresholds; most must survive with near-identical features.
    iou_matched = 0
    for box, feat in zip(fast.boxes, fast.features, strict=True):
        d = np.abs(ref.boxes - box).max(axis=1)
        j = int(d.argmin())
        if d[j] < 2.0:
            cos = feat @ ref.features[j] / (np.linalg.norm(feat) * np.linalg.norm(ref.features[j]))
            assert cos > 0.99
            iou_matched += 1
    assert iou_matched >= 0.7 * ref.num_boxes
