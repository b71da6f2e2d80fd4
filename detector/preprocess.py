"""Caffe ``_get_image_blob``, exactly: BGR uint8 image to the network's input tensor.

Shape glossary:
    H, W     original image height and width (pixels)
    Hs, Ws   resized height and width: ``round(H * s)``, ``round(W * s)``
    B        images with the same (Hs, Ws), stacked without padding

The original pipeline (reference §1.1, §14 steps 1-3), in order:

1. ``im.astype(float32)``; ``im -= PIXEL_MEANS`` (BGR, float64 means, so NumPy subtracts in
   float64 and rounds to float32). No division by a standard deviation.
2. ``s = min_size / min(H, W)``; if ``np.round(s * max(H, W)) > max_size``:
   ``s = max_size / max(H, W)`` (NumPy rounds half to even).
3. ``cv2.resize(im, None, fx=s, fy=s, interpolation=INTER_LINEAR)`` on the float32 image: output
   ``(cvRound(H*s), cvRound(W*s))`` (half to even), source coordinate ``(d + 0.5) / s - 0.5``
   with the step exactly ``1/s`` (not ``H/Hs``), clamped at 0, last row/column repeated, no
   antialiasing when shrinking.

Step 3 runs in torch so it works on any device: ``aten.upsample_bilinear2d`` with an explicit
output size and ``scales_h = scales_w = s`` (torch's ``scales`` are output/input, checked
against cv2 in the tests) uses the same ``1/s`` step and clamping. Its float32 kernel computes
source coordinates in float32 (an error of ~6e-5 px near x = 1000, up to 1e-2 in value on a
high-contrast image), while cv2 computes them in double, so the kernel runs in float64 and the
result is rounded to float32: measured max |difference| to cv2 about 3e-5 (float32 rounding).
``F.interpolate(size=...)`` derives the step from ``H/Hs`` and is off by up to 55/255.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from butd.detector.config import ExtractionConfig

logger = logging.getLogger(__name__)

Device = str | torch.device


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the backbone.

    Attributes:
        tensor: (3, Hs, Ws) float32 BGR, mean subtracted, then resized (CHW).
        scale: s, resized / original (the same factor on both axes).
        orig_h: H, original height in pixels.
        orig_w: W, original width in pixels.
    """

    tensor: torch.Tensor
    scale: float
    orig_h: int
    orig_w: int

    def __post_init__(self) -> None:
        t = self.tensor
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"tensor must be (3, Hs, Ws); got {shape}")
        if t.dtype != torch.float32:
            raise ValueError(f"tensor must be float32; got {t.dtype}")
        expected = resized_shape(self.orig_h, self.orig_w, self.scale)
        if self.resized_hw != expected:
            raise ValueError(
                f"tensor is {self.resized_hw} but {self.orig_h}x{self.orig_w} at scale "
                f"{self.scale} resizes to {expected}"
            )

    @property
    def resized_hw(self) -> tuple[int, int]:
        """(Hs, Ws), the network input size."""
        return int(self.tensor.shape[1]), int(self.tensor.shape[2])


def compute_scale(h: int, w: int, min_size: int = 600, max_size: int = 1000) -> float:
    """Caffe's test scale: short side to ``min_size`` unless the long side would pass ``max_size``.

    Args:
        h: image height, pixels.
        w: image width, pixels.
        min_size: target short side (Caffe TEST.SCALES[0]).
        max_size: cap on the rounded long side (Caffe TEST.MAX_SIZE).

    Returns:
        s as a Python float (double), exactly as the original computes it.
    """
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive; got {h}x{w}")
    if min_size < 1 or max_size < 1:
        raise ValueError(f"min_size and max_size must be positive; got {min_size}, {max_size}")
    short, long = min(h, w), max(h, w)
    scale = float(min_size) / float(short)
    if np.round(scale * long) > max_size:  # half to even, as np.round
        scale = float(max_size) / float(long)
    return scale


def resized_shape(h: int, w: int, scale: float) -> tuple[int, int]:
    """``(Hs, Ws)`` that ``cv2.resize(fx=scale, fy=scale)`` produces: round half to even.

    cv2 computes ``saturate_cast<int>(size * scale)`` in double (``cvRound``, i.e. ``lrint``);
    Python's ``round`` of a float is the same correctly rounded half-to-even.
    """
    hs, ws = round(h * scale), round(w * scale)
    if hs < 1 or ws < 1:
        raise ValueError(f"{h}x{w} at scale {scale} resizes to an empty {hs}x{ws} image")
    return hs, ws


def resize_like_cv2(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``cv2.resize(fx=scale, fy=scale, INTER_LINEAR)`` of float images, on any device.

    Args:
        x: (C, H, W) or (B, C, H, W) float32.
        scale: s > 0, output / input on both axes.

    Returns:
        (C, Hs, Ws) or (B, C, Hs, Ws) float32 on ``x``'s device, (Hs, Ws) = resized_shape.
    """
    if x.dim() not in (3, 4):
        raise ValueError(f"x must be (C, H, W) or (B, C, H, W); got {tuple(x.shape)}")
    if not scale > 0:
        raise ValueError(f"scale must be positive; got {scale}")
    batched = x if x.dim() == 4 else x[None]
    size = list(resized_shape(int(x.shape[-2]), int(x.shape[-1]), scale))
    # float64: source coordinates in double, as cv2 computes them (module docstring).
    out: torch.Tensor = torch.ops.aten.upsample_bilinear2d(
        batched.double(), size, False, scale, scale
    ).to(torch.float32)
    return out if x.dim() == 4 else out[0]


def subtract_mean(
    image_bgr: np.ndarray | torch.Tensor, pixel_mean: Sequence[float], device: Device
) -> torch.Tensor:
    """(H, W, 3) uint8 BGR to (3, H, W) float32 minus the BGR mean, NumPy's arithmetic.

    ``im.astype(float32) -= means`` with float64 means subtracts in float64 and rounds once to
    float32; uint8 and float64 make the same computation exact here. ``image_bgr`` may be a
    uint8 tensor already in pinned host memory (``stage_pixels``): its copy to the device is
    then asynchronous.
    """
    _check_image(image_bgr)
    mean = torch.tensor(pixel_mean, dtype=torch.float64, device=device).view(3, 1, 1)
    pixels = (
        image_bgr
        if isinstance(image_bgr, torch.Tensor)
        else torch.from_numpy(np.ascontiguousarray(image_bgr))
    )
    pixels = pixels.to(device, non_blocking=True)  # uint8 transfer
    chw = pixels.permute(2, 0, 1).to(torch.float64)  # (3, H, W)
    # In place: one float64 copy of the image at a time (24 bytes a pixel), not two.
    return chw.sub_(mean).to(torch.float32)


def stage_pixels(image_bgr_uint8: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 BGR copied into pinned (page-locked) host memory, for a CUDA device.

    A copy from pinned memory runs asynchronously (``non_blocking=True``) and at full bus
    speed; torch's pinned allocator keeps the block until the copy has been done.
    """
    _check_image(image_bgr_uint8)
    return torch.from_numpy(np.ascontiguousarray(image_bgr_uint8)).pin_memory()


def prepare(
    image_bgr_uint8: np.ndarray | torch.Tensor,
    config: ExtractionConfig,
    *,
    device: Device = "cpu",
) -> PreparedImage:
    """Caffe ``_get_image_blob`` for one image.

    Args:
        image_bgr_uint8: (H, W, 3) uint8 BGR, as ``butd.images.decode_image`` returns (or
            ``stage_pixels`` of it).
        config: ``min_size``, ``max_size`` and ``pixel_mean`` are read.
        device: where the subtraction and resize run and the tensor lives.

    Returns:
        PreparedImage with a (3, Hs, Ws) float32 tensor on ``device``.
    """
    _check_image(image_bgr_uint8)
    h, w = int(image_bgr_uint8.shape[0]), int(image_bgr_uint8.shape[1])
    scale = compute_scale(h, w, config.min_size, config.max_size)
    chw = subtract_mean(image_bgr_uint8, config.pixel_mean, device)
    return PreparedImage(tensor=resize_like_cv2(chw, scale), scale=scale, orig_h=h, orig_w=w)


def group_by_shape(prepared: Sequence[PreparedImage]) -> list[list[int]]:
    """Indices of images with equal (Hs, Ws), groups in order of first appearance.

    Returns:
        One list per distinct resized shape, indices ascending within each list.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(prepared):
        groups.setdefault(p.resized_hw, []).append(i)
    return list(groups.values())


def stack_group(prepared: Sequence[PreparedImage]) -> torch.Tensor:
    """(B, 3, Hs, Ws) float32 batch of images that share one resized shape (no padding)."""
    if not prepared:
        raise ValueError("stack_group needs at least one image")
    shapes = {p.resized_hw for p in prepared}
    if len(shapes) != 1:
        raise ValueError(f"images in one batch must share (Hs, Ws); got {sorted(shapes)}")
    return torch.stack([p.tensor for p in prepared])


def _check_image(image: np.ndarray | torch.Tensor) -> None:
    if isinstance(image, torch.Tensor):
        dtype_ok = image.dtype == torch.uint8
    elif isinstance(image, np.ndarray):
        dtype_ok = image.dtype == np.uint8
    else:
        raise TypeError(f"image must be a numpy array; got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or not dtype_ok:
        raise ValueError(
            f"image must be (H, W, 3) uint8 BGR; got {tuple(image.shape)} {image.dtype}"
        )
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must be non-empty; got {tuple(image.shape)}")
