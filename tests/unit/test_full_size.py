"""The full ResNet-101 network at the Caffe input size (600x1000): shapes and the region rule.

Random weights: what is checked is the architecture at full size (feature-map sizes through the
ceil-mode pool, 2048-d features, 1601/401 outputs) and the record contract. The RPN keeps 12
proposals instead of 300: res5 over 300 RoIs is ~1.4 TFLOP, minutes on 2 CPU cores, and
``bench/detector.py`` times that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from butd.detector.config import ExtractionConfig, ModelSpec
from butd.detector.extractor import Extractor
from tests.tiny_weights import random_detector

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def r101() -> Extractor:
    torch.set_num_threads(2)
    return Extractor(
        random_detector(ModelSpec(), seed=0),
        config=ExtractionConfig(rpn_post_nms_topk=12),
        weights_sha256="r101",
    )


def test_r101_shapes_at_600x1000(r101: Extractor) -> None:
    image = np.ascontiguousarray(np.tile(data.coffee(), (2, 2, 1))[:600, :1000, ::-1])
    shapes = []
    hook = r101.model.backbone.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
    record = r101.extract([image], ["coffee"])[0]
    hook.remove()
    # 600x1000 -> conv1 300x500 -> ceil pool 150x250 -> res3 75x125 -> res4 38x63
    assert [tuple(s) for s in shapes] == [(1, 1024, 38, 63)]
    assert 10 <= record.num_boxes <= 100
    assert record.features.shape == (record.num_boxes, 2048)
    assert np.all(record.features >= 0)  # pool5 is post-ReLU
    assert record.boxes[:, 2].max() <= 999.0 + 1e-3 and record.boxes[:, 3].max() <= 599.0 + 1e-3
    assert record.objects_id.max() < 1600 and record.attrs_id.max() < 400
