"""butd.detector.preprocess against the original Caffe ``_get_image_blob`` run with NumPy + OpenCV.

Reference: ``caffe_blob`` below is ``lib/fast_rcnn/test.py::_get_image_blob`` with the cfg
lookups inlined. Tolerance: max |difference| <= 1e-3 on the 0..255 scale (measured ~3e-5: the
float32 rounding of two different summation orders). ``F.interpolate(size=...)`` misses it by
orders of magnitude, which the tests show so a regression to it is caught.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F

from butd.detector.config import ExtractionConfig
from butd.detector.preprocess import (
    PreparedImage,
    compute_scale,
    group_by_shape,
    prepare,
    resize_like_cv2,
    resized_shape,
    stack_group,
    subtract_mean,
)

TOL = 1e-3
PIXEL_MEANS = np.array([[[102.9801, 115.9465, 122.7717]]])  # float64, as in Caffe's config.py


def caffe_blob(
    im: np.ndarray, min_size: int = 600, max_size: int = 1000
) -> tuple[np.ndarray, float]:
    """``_get_image_blob`` for one scale: (Hs, Ws, 3) float32 and the scale."""
    im_orig = im.astype(np.float32, copy=True)
    im_orig -= PIXEL_MEANS
    im_size_min = np.min(im_orig.shape[0:2])
    im_size_max = np.max(im_orig.shape[0:2])
    im_scale = float(min_size) / float(im_size_min)
    if np.round(im_scale * im_size_max) > max_size:
        im_scale = float(max_size) / float(im_size_max)
    out = cv2.resize(im_orig, None, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR)
    return out, im_scale


def cv2_resize(im_hwc: np.ndarray, scale: float) -> np.ndarray:
    return cv2.resize(im_hwc, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)


def ours_hwc(im_hwc: np.ndarray, scale: float) -> np.ndarray:
    chw = torch.from_numpy(np.ascontiguousarray(im_hwc.transpose(2, 0, 1)))
    return resize_like_cv2(chw, scale).permute(1, 2, 0).numpy()


def _photo(name: str, h: int, w: int, transpose: bool = False) -> np.ndarray:
    """A BGR crop of an skimage photo (a real image with real edges)."""
    rgb = getattr(skimage.data, name)()
    if transpose:
        rgb = rgb.transpose(1, 0, 2)
    return np.ascontiguousarray(rgb[:h, :w, ::-1])


# --- scale -------------------------------------------------------------------------------


def _decimal_scale(h: int, w: int, min_size: int, max_size: int) -> float:
    """Plain reimplementation: the float product, rounded half-to-even by ``decimal``."""
    scale = min_size / min(h, w)
    rounded = Decimal(scale * max(h, w)).quantize(Decimal(1), rounding=ROUND_HALF_EVEN)
    return max_size / max(h, w) if rounded > max_size else scale


def test_compute_scale_matches_decimal_reference_on_many_sizes() -> None:
    rng = np.random.default_rng(0)
    sizes = [(int(a), int(b)) for a, b in rng.integers(1, 3000, (3000, 2))]
    sizes += [(400, 667), (667, 400), (400, 668), (480, 802), (600, 1000), (1, 1)]
    for h, w in sizes:
        for min_size, max_size in ((600, 1000), (800, 1333), (224, 224)):
            assert compute_scale(h, w, min_size, max_size) == _decimal_scale(
                h, w, min_size, max_size
            ), (h, w, min_size, max_size)


def test_compute_scale_half_to_even_boundary() -> None:
    # 600/400 * 667 = 1000.5 exactly: half-to-even gives 1000, not > 1000, so s stays 1.5
    # (half-up would give 1001 and switch to 1000/667).
    assert 1.5 * 667 == 1000.5
    assert compute_scale(400, 667) == 1.5
    assert compute_scale(667, 400) == 1.5
    assert resized_shape(400, 667, 1.5) == (600, 1000)  # cv2 rounds 1000.5 to 1000 as well
    # 1.5 * 669 = 1003.5 -> 1004 > 1000: the max-size branch.
    assert compute_scale(400, 669) == 1000 / 669


@pytest.mark.parametrize(
    ("h", "w", "scale", "hw"),
    [
        (333, 500, 600 / 333, (600, 901)),
        (640, 407, 600 / 407, (943, 600)),
        (391, 408, 600 / 391, (600, 626)),
        (480, 640, 1.25, (600, 800)),
        (375, 1000, 1.0, (375, 1000)),  # 1.6 * 1000 > 1000: max-size branch
        (1200, 1600, 0.5, (600, 800)),
    ],
)
def test_compute_scale_known_cases(h: int, w: int, scale: float, hw: tuple[int, int]) -> None:
    assert compute_scale(h, w) == scale
    assert resized_shape(h, w, scale) == hw


def test_compute_scale_rejects_empty() -> None:
    with pytest.raises(ValueError, match="positive"):
        compute_scale(0, 10)


def test_resized_shape_matches_cv2_including_half_cases() -> None:
    scales = [0.5, 1.5, 2.5, 0.25, 0.75, 1.25, 600 / 333, 600 / 407, 1.8018, 0.37, 0.6]
    checked = halves = 0
    for n in range(2, 260):
        h, w = n, n + 3
        for s in [*scales, 1000 / n, 600 / n]:
            if round(h * s) < 1:
                continue
            expected = cv2_resize(np.zeros((h, w), np.float32), s).shape
            assert resized_shape(h, w, s) == expected, (h, w, s)
            checked += 1
            halves += (h * s) % 1 == 0.5 or (w * s) % 1 == 0.5
    assert checked > 3000 and halves > 200  # x.5 cases exercised: cv2 rounds half to even


# --- resize ------------------------------------------------------------------------------

SCALES = [1.8018, 1.4742, 1.5345, 1.25, 0.6, 0.37, 0.5, 2.0]


@pytest.mark.parametrize("scale", SCALES)
def test_resize_matches_cv2_on_random_float_images(scale: float) -> None:
    rng = np.random.default_rng(int(scale * 1000))
    # Worst case for interpolation: uncorrelated neighbours over the mean-subtracted range.
    im = rng.uniform(-123.0, 153.0, (57, 91, 3)).astype(np.float32)
    ref = cv2_resize(im, scale)
    ours = ours_hwc(im, scale)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize(
    ("name", "h", "w", "transpose"),
    [
        ("coffee", 333, 500, False),
        ("rocket", 640, 407, True),
        ("astronaut", 391, 408, False),
        ("chelsea", 300, 451, False),
        ("astronaut", 512, 512, False),
    ],
)
def test_prepare_matches_caffe_blob_on_photos(name: str, h: int, w: int, transpose: bool) -> None:
    im = _photo(name, h, w, transpose)
    assert im.shape == (h, w, 3)
    ref, ref_scale = caffe_blob(im)
    prepared = prepare(im, ExtractionConfig())
    assert prepared.scale == ref_scale
    assert (prepared.orig_h, prepared.orig_w) == (h, w)
    assert prepared.resized_hw == ref.shape[:2]
    ours = prepared.tensor.permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("scale", [1.8018, 1.4742, 1.5345, 1.25, 0.6, 0.37])
def test_resize_matches_cv2_on_a_photo_at_fixed_scales(scale: float) -> None:
    im = _photo("coffee", 200, 301).astype(np.float32) - PIXEL_MEANS.astype(np.float32)
    assert np.abs(ours_hwc(im, scale) - cv2_resize(im, scale)).max() <= TOL


def test_other_sizes_from_config() -> None:
    im = _photo("chelsea", 300, 451)
    ref, scale = caffe_blob(im, min_size=800, max_size=1333)
    prepared = prepare(im, ExtractionConfig(min_size=800, max_size=1333))
    assert prepared.scale == scale
    assert np.abs(prepared.tensor.permute(1, 2, 0).numpy() - ref).max() <= TOL


def test_f_interpolate_size_misses_the_tolerance() -> None:
    """The resize the HF/airsplay ports use: step H/Hs instead of 1/s (reference §12.1)."""
    im = _photo("coffee", 333, 500).astype(np.float32) - PIXEL_MEANS.astype(np.float32)
    scale = compute_scale(333, 500)
    ref = cv2_resize(im, scale)
    chw = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))[None]
    wrong = F.interpolate(chw, size=ref.shape[:2], mode="bilinear", align_corners=False)
    wrong_err = np.abs(wrong[0].permute(1, 2, 0).numpy() - ref).max()
    ours_err = np.abs(ours_hwc(im, scale) - ref).max()
    assert wrong_err > 1.0 > TOL >= ours_err


def test_float32_kernel_would_miss_the_tolerance() -> None:
    """Why the resize runs in float64: float32 source coordinates drift near x = 600."""
    im = np.random.default_rng(1).uniform(-123.0, 153.0, (407, 407, 3)).astype(np.float32)
    scale = 600 / 407
    ref = cv2_resize(im, scale)
    chw = torch.from_numpy(np.ascontiguousarray(im.transpose(2, 0, 1)))[None]
    fp32 = torch.ops.aten.upsample_bilinear2d(chw, list(ref.shape[:2]), False, scale, scale)
    assert np.abs(fp32[0].permute(1, 2, 0).numpy() - ref).max() > TOL
    assert np.abs(ours_hwc(im, scale) - ref).max() <= TOL


def test_batched_resize_equals_per_image() -> None:
    x = torch.from_numpy(np.random.default_rng(2).normal(0, 50, (2, 3, 20, 30)).astype(np.float32))
    out = resize_like_cv2(x, 1.4742)
    assert out.shape == (2, 3, 29, 44)
    for i in range(2):
        assert torch.equal(out[i], resize_like_cv2(x[i], 1.4742))


# --- mean, prepare, grouping -------------------------------------------------------------


def test_subtract_mean_is_numpys_arithmetic_exactly() -> None:
    im = np.random.default_rng(3).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    ref = im.astype(np.float32, copy=True)
    ref -= PIXEL_MEANS  # float64 means: computed in float64, stored float32
    ours = subtract_mean(im, ExtractionConfig().pixel_mean, "cpu")
    assert ours.dtype == torch.float32 and ours.shape == (3, 7, 9)
    np.testing.assert_array_equal(ours.permute(1, 2, 0).numpy(), ref)


def test_prepare_rejects_bad_images() -> None:
    with pytest.raises(ValueError, match="uint8"):
        prepare(np.zeros((10, 10, 3), np.float32), ExtractionConfig())
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        prepare(np.zeros((10, 10), np.uint8), ExtractionConfig())


def _prepared(h: int, w: int) -> PreparedImage:
    scale = compute_scale(h, w)
    hs, ws = resized_shape(h, w, scale)
    return PreparedImage(torch.zeros(3, hs, ws), scale, h, w)


def test_prepared_image_checks_its_tensor() -> None:
    with pytest.raises(ValueError, match="float32"):
        PreparedImage(torch.zeros(3, 600, 800, dtype=torch.float64), 1.25, 480, 640)
    with pytest.raises(ValueError, match=r"resizes to \(600, 800\)"):
        PreparedImage(torch.zeros(3, 600, 801), 1.25, 480, 640)
    with pytest.raises(ValueError, match=r"\(3, Hs, Ws\)"):
        PreparedImage(torch.zeros(600, 800), 1.25, 480, 640)


def test_group_by_shape_keeps_first_appearance_order() -> None:
    # (480, 640) and (960, 1280) both resize to 600x800; (333, 500) to 600x901.
    items = [_prepared(*hw) for hw in [(333, 500), (480, 640), (640, 480), (960, 1280), (333, 500)]]
    assert group_by_shape(items) == [[0, 4], [1, 3], [2]]
    assert group_by_shape([]) == []


def test_stack_group() -> None:
    items = [_prepared(480, 640), _prepared(960, 1280)]
    assert stack_group(items).shape == (2, 3, 600, 800)
    with pytest.raises(ValueError, match="share"):
        stack_group([_prepared(480, 640), _prepared(333, 500)])


@pytest.mark.gpu
def test_prepare_on_cuda_matches_caffe_blob() -> None:
    im = _photo("rocket", 640, 407, transpose=True)
    ref, _ = caffe_blob(im)
    prepared = prepare(im, ExtractionConfig(), device="cuda")
    assert prepared.tensor.device.type == "cuda"
    assert np.abs(prepared.tensor.permute(1, 2, 0).cpu().numpy() - ref).max() <= TOL
