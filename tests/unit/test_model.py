"""The network against independent references.

* backbone and res5: torchvision's ResNet modified as reference §9.3 prescribes (stride moved to
  the 1x1, ceil-mode pool, dilated res5), same weights; tolerance 1e-4 relative.
* RoI pooling + res5 + mean: a NumPy reimplementation of the Caffe ROIPooling kernel formula.
* RPN proposals: a NumPy reimplementation of Caffe's proposal layer, anchors as tabulated in
  reference §1.3.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from butd.detector.config import ArchConfig, ExtractionConfig, ModelSpec
from butd.detector.model import Detector
from tests.tiny_weights import random_detector, tiny_spec
from tests.unit.caffe_reference import caffe_proposals, caffe_roi_pool

torch.set_num_threads(2)


def _torchvision_reference(model: Detector, blocks: list[int]) -> nn.Module:
    """torchvision ResNet with the Caffe changes of §9.3 and ``model``'s weights."""
    ref = torchvision.models.resnet.ResNet(torchvision.models.resnet.Bottleneck, blocks)
    ref.maxpool = nn.MaxPool2d(3, 2, padding=0, ceil_mode=True)
    for layer in (ref.layer2, ref.layer3):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    ref.layer4[0].conv2.stride = (1, 1)
    ref.layer4[0].downsample[0].stride = (1, 1)
    for block in ref.layer4:
        block.conv2.dilation, block.conv2.padding = (2, 2), (2, 2)
    renamed = {}
    for key, value in model.state_dict().items():
        name = key.replace("backbone.stem.conv", "conv1").replace("backbone.stem.bn", "bn1")
        name = name.replace("roi_heads.res5", "layer4")
        for stage, layer in (("res2", "layer1"), ("res3", "layer2"), ("res4", "layer3")):
            name = name.replace(f"backbone.{stage}", layer)
        name = name.replace("shortcut_bn", "downsample.1").replace("shortcut", "downsample.0")
        renamed[name] = value
    missing, _ = ref.load_state_dict(renamed, strict=False)
    assert all(k.endswith("num_batches_tracked") or k.startswith("fc.") for k in missing), missing
    return ref.eval()


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[Detector, nn.Module]:
    blocks = [1, 1, 2, 1]
    arch = ArchConfig(stage_blocks=(1, 1, 2, 1), num_classes=8, num_attributes=6)
    model = random_detector(ModelSpec(arch=arch), seed=3)
    return model, _torchvision_reference(model, blocks)


def test_backbone_matches_modified_torchvision_resnet(resnet_pair) -> None:
    model, ref = resnet_pair
    x = torch.randn(2, 3, 67, 93) * 50
    with torch.no_grad():
        ours = model.backbone(x)
        theirs = ref.layer3(ref.layer2(ref.layer1(ref.maxpool(ref.relu(ref.bn1(ref.conv1(x)))))))
    # 67x93 -> conv 34x47 -> ceil pool 17x23 -> 9x12 -> 5x6: ceil mode matters here.
    assert ours.shape == theirs.shape == (2, 1024, 5, 6)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_res5_is_dilated_stride_one_and_matches_reference(resnet_pair) -> None:
    model, ref = resnet_pair
    pooled = torch.relu(torch.randn(3, 1024, 14, 14))
    with torch.no_grad():
        ours = model.roi_heads.res5(pooled)
        theirs = ref.layer4(pooled)
    assert ours.shape == (3, 2048, 14, 14)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_pooled_features_follow_caffe_roi_pooling() -> None:
    model = random_detector(seed=1)
    res4 = torch.randn(2, model.spec.arch.res4_channels, 9, 13)
    boxes = np.array([[0, 0, 100, 60], [17.3, 5.5, 180.2, 139.9], [40, 40, 48, 47]], np.float32)
    rois = torch.tensor([[0, *boxes[0]], [1, *boxes[1]], [1, *boxes[2]]], dtype=torch.float32)
    with torch.no_grad():
        ours = model.roi_heads.pooled_features(res4, rois)
        expected = []
        for b, *box in rois.numpy():
            pooled = caffe_roi_pool(res4[int(b)].numpy(), np.array(box), 14, 1 / 16)
            expected.append(model.roi_heads.res5(torch.from_numpy(pooled)[None]).mean((2, 3))[0])
    torch.testing.assert_close(ours, torch.stack(expected), rtol=1e-5, atol=1e-5)


def test_rpn_proposals_match_caffe_proposal_layer() -> None:
    model = random_detector(seed=2)
    cfg = ExtractionConfig(rpn_pre_nms_topk=400, rpn_post_nms_topk=60)
    res4 = torch.randn(1, model.spec.arch.res4_channels, 8, 11)
    img_h, img_w, scale = 125, 170, 0.85
    with torch.no_grad():
        ours = model.rpn(res4, [(img_h, img_w)], [scale], cfg)[0].numpy()
        obj, deltas = model.rpn.head(res4)
    expected = caffe_proposals(obj.numpy(), deltas.numpy(), img_h, img_w, scale, cfg)
    assert ours.shape == expected.shape and len(ours) > 10
    np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-3)


def test_detector_state_dict_is_the_canonical_key_table() -> None:
    from butd.detector.weights.canonical import canonical_shapes

    spec = tiny_spec()
    model = Detector(spec)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == dict(canonical_shapes(spec.arch, spec.conventions))
