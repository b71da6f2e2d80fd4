"""The Extractor end to end, on the narrow test model (same code path as ResNet-101).

The reference pipeline here is assembled from independent pieces: the scale rule written out,
``cv2.resize(fx=s, fy=s)`` on the mean-subtracted float image, the NumPy reimplementation of Caffe's
proposal layer, and a plain loop of per-class NMS calls for the generate_tsv.py selection
(``tests/unit/reference_nms.py``).
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from butd.detector.extractor import Extractor
from tests.tiny_weights import random_detector
from tests.unit.caffe_reference import caffe_proposals
from tests.unit.reference_nms import reference_select

torch.set_num_threads(2)
MEAN = np.array([102.9801, 115.9465, 122.7717], dtype=np.float32)


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    model = random_detector(seed=5)
    return Extractor(
        model,
        config=model.spec.default_extraction(),
        weights_sha256="f" * 64,
        batch_size=4,
    )


def photo(name: str, size: tuple[int, int]) -> np.ndarray:
    """A real skimage photo as BGR uint8, resized (cv2 INTER_AREA) to ``size`` = (w, h)."""
    rgb = getattr(data, name)()
    if rgb.ndim == 2:
        rgb = np.stack([rgb] * 3, axis=2)
    return cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), size, interpolation=cv2.INTER_AREA)


def reference_extract(ext: Extractor, image: np.ndarray):
    cfg = ext.config
    h, w = image.shape[:2]
    s = cfg.min_size / min(h, w)
    if np.round(s * max(h, w)) > cfg.max_size:
        s = cfg.max_size / max(h, w)
    resized = cv2.resize(
        image.astype(np.float32) - MEAN, None, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR
    )
    x = torch.from_numpy(resized.transpose(2, 0, 1).copy())[None]
    model = ext.model
    with torch.no_grad():
        res4 = model.backbone(x)
        obj, deltas = model.rpn.head(res4)
        rois = caffe_proposals(
            obj.numpy(), deltas.numpy(), resized.shape[0], resized.shape[1], s, cfg
        )
        batch_rois = torch.from_numpy(np.hstack([np.zeros((len(rois), 1), np.float32), rois]))
        feats = model.roi_heads.pooled_features(res4, batch_rois).numpy()
        logits = model.roi_heads.predict(torch.from_numpy(feats))[0].double().numpy()
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob = (prob / prob.sum(1, keepdims=True)).astype(np.float32)
    boxes = rois / np.float32(s)
    keep, _ = reference_select(
        boxes,
        prob,
        nms_thresh=cfg.nms_thresh,
        conf_thresh=cfg.conf_thresh,
        min_boxes=cfg.min_boxes,
        max_boxes=cfg.max_boxes,
    )
    return boxes[keep], feats[keep], prob[keep]


def _sorted_rows(boxes: np.ndarray) -> np.ndarray:
    return np.lexsort(boxes.T[::-1])


@pytest.mark.parametrize(("name", "size"), [("coffee", (300, 200)), ("astronaut", (170, 230))])
def test_extract_matches_reference_pipeline(extractor, name, size) -> None:
    image = photo(name, size)
    record = extractor.extract([image], ["x"])[0]
    ref_boxes, ref_feats, ref_prob = reference_extract(extractor, image)
    assert record.num_boxes == len(ref_boxes)
    ours, theirs = _sorted_rows(record.boxes), _sorted_rows(ref_boxes)  # compare as sets
    np.testing.assert_allclose(record.boxes[ours], ref_boxes[theirs], atol=2e-3)
    np.testing.assert_allclose(record.features[ours], ref_feats[theirs], rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(record.objects_id[ours], ref_prob[theirs, 1:].argmax(1))
    np.testing.assert_allclose(record.objects_conf[ours], ref_prob[theirs, 1:].max(1), atol=1e-5)


def test_record_contract(extractor) -> None:
    image = photo("chelsea", (200, 150))
    record = extractor.extract([image], ["cat.jpg"])[0]
    cfg, spec = extractor.config, extractor.spec
    assert (record.image_id, record.image_w, record.image_h) == ("cat.jpg", 200, 150)
    assert cfg.min_boxes <= record.num_boxes <= cfg.max_boxes
    assert record.features.shape == (record.num_boxes, spec.arch.feature_dim)
    assert np.all(record.boxes[:, :2] >= 0)
    assert np.all(record.boxes[:, 2] <= 200 - 1 + 1e-3) and np.all(record.boxes[:, 3] <= 149.001)
    assert record.objects_id.max() < spec.arch.num_classes
    assert record.attrs_id.max() < spec.arch.num_attributes
    assert np.all((record.attrs_conf > 0) & (record.attrs_conf <= 1))
    assert record.model_version == extractor.model_version


def test_batched_equals_one_at_a_time(extractor) -> None:
    """Same regions, labels and (to float summation order) features, batched or alone.

    No padding is involved. oneDNN (and cuDNN) pick batch-size-dependent convolution kernels
    for some shapes (measured here on res3/res4 of small maps), so features agree to ~1e-6
    relative rather than bit for bit; the tolerances below are 10x that (relative), features
    and confidences alike (a confidence once differed by 1.5e-6 against an absolute-only 1e-6).
    """
    images = [photo(n, (180, 120)) for n in ("coffee", "chelsea", "rocket")]
    images.append(photo("astronaut", (120, 160)))  # another shape: its own backbone pass
    ids = [f"im{i}" for i in range(len(images))]
    together = extractor.extract(images, ids)
    for image, image_id, batched in zip(images, ids, together, strict=True):
        alone = extractor.extract([image], [image_id])[0]
        assert batched.image_id == image_id
        np.testing.assert_array_equal(batched.objects_id, alone.objects_id)
        np.testing.assert_array_equal(batched.attrs_id, alone.attrs_id)
        np.testing.assert_allclose(batched.boxes, alone.boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(batched.features, alone.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.objects_conf, alone.objects_conf, rtol=1e-5, atol=1e-6)


def test_mixed_shapes_share_one_roi_head_call_and_equal_one_at_a_time(extractor) -> None:
    """Real photo sizes (five resized shapes) fill one batch: one backbone pass per shape,
    unpadded, and one RoI head call (res5) for all; regions as one image at a time, features
    within the batching tolerances above (res5 sees a larger batch of RoIs)."""
    sizes = [(160, 120), (120, 160), (160, 107), (150, 150), (160, 90), (160, 120)]
    names = ["coffee", "chelsea", "rocket", "astronaut", "coffee", "camera"]
    images = [photo(n, size) for n, size in zip(names, sizes, strict=True)]
    ids = [f"m{i}" for i in range(len(images))]
    calls: list[list[int]] = []
    model = extractor.model
    real = model.regions_mixed

    def counting(maps):
        calls.append([int(res4.shape[0]) for res4, _ in maps])
        return real(maps)

    config = extractor.config.replace(rpn_pre_nms_topk=300, rpn_post_nms_topk=20)
    model.regions_mixed = counting
    try:
        wide = Extractor(model, config=config, weights_sha256="f" * 64, batch_size=len(images))
        together = wide.extract(images, ids)
    finally:
        del model.regions_mixed
    assert calls == [[2, 1, 1, 1, 1]]  # one call; the two 160x120 images share a backbone pass
    for image, image_id, batched in zip(images, ids, together, strict=True):
        alone = wide.extract([image], [image_id])[0]
        assert batched.image_id == image_id and batched.image_w == image.shape[1]
        np.testing.assert_array_equal(batched.objects_id, alone.objects_id)
        np.testing.assert_array_equal(batched.attrs_id, alone.attrs_id)
        np.testing.assert_allclose(batched.boxes, alone.boxes, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(batched.features, alone.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(batched.objects_conf, alone.objects_conf, rtol=1e-5, atol=1e-6)


def test_a_staged_image_extracts_exactly_as_the_image(extractor) -> None:
    """``stage`` (the loader threads' half of preparation) changes nothing, bit for bit."""
    images = [photo("coffee", (170, 110)), photo("chelsea", (110, 170))]
    config = extractor.config.replace(rpn_pre_nms_topk=300, rpn_post_nms_topk=20)
    staged = [extractor.stage(im, config) for im in images]
    direct = extractor.extract(images, ["a", "b"], config)
    via = extractor.extract(staged, ["a", "b"], config)
    for x, y in zip(direct, via, strict=True):
        for name in ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf"):
            assert getattr(x, name).tobytes() == getattr(y, name).tobytes(), name
    other = extractor.config.replace(min_size=64)
    with pytest.raises(ValueError, match="staged at scale"):
        extractor.extract(staged[:1], ["a"], config=other)


def test_extract_with_boxes_uses_the_given_boxes(extractor) -> None:
    image = photo("coffee", (240, 160))
    given = np.array([[10, 12, 90, 100], [0, 0, 239, 159], [120.5, 30.25, 200, 150]], np.float32)
    record = extractor.extract_with_boxes(image, given, "gt")
    np.testing.assert_array_equal(record.boxes, given)
    from butd.detector.preprocess import prepare

    prepared = prepare(image, extractor.config)
    rois = torch.cat([torch.zeros(3, 1), torch.from_numpy(given) * prepared.scale], dim=1)
    with torch.no_grad():
        res4 = extractor.model.backbone(prepared.tensor[None])
        feats = extractor.model.roi_heads.pooled_features(res4, rois)
        logits = extractor.model.roi_heads.predict(feats)[0]
    np.testing.assert_allclose(record.features, feats.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(record.objects_id, logits[:, 1:].argmax(1).numpy())


def test_per_call_config_changes_counts_and_version(extractor) -> None:
    image = photo("chelsea", (200, 150))
    fixed = extractor.config.replace(min_boxes=7, max_boxes=7)
    record = extractor.extract([image], ["a"], config=fixed)[0]
    assert record.num_boxes == 7
    assert record.model_version == extractor.version_for(fixed) != extractor.model_version
