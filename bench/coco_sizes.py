"""COCO-like image sizes, and how full the detector's batches are on them.

COCO's images are Flickr's 640-pixel renditions ("_z" URLs): the long side is 640 for nearly
all, the short side follows the camera's aspect ratio and the photographer's crop. Facts used
(COCO site and dataset statistics): the first val2017 entries are 640x427, 352x230 and 640x480;
90 % of train images have 167,500..355,840 pixels and a height/width ratio in 0.6..1.5. The
weights below are an illustrative model of that mix, NOT measured frequencies:

==========================  ======  =============================================
short side (long side 640)  weight  what
==========================  ======  =============================================
480                         0.35    4:3 compact / phone cameras
427                         0.20    3:2 DSLR
424, 425, 426, 428, 429     0.10    3:2 with a crop of a pixel or two
360                         0.05    16:9
512                         0.03    5:4
640                         0.03    square (Instagram-era uploads)
uniform in 300..479         0.14    free crops
smaller images              0.10    long side uniform in 300..639, ratio 0.6..0.8
==========================  ======  =============================================

A quarter of the images are portrait (w and h swapped). At the Caffe scale (short side 600,
long side <= 1000) each distinct short side gives a distinct network input shape.
"""

from __future__ import annotations

import random

from butd.detector.preprocess import compute_scale, resized_shape

_COMMON = ((480, 0.35), (427, 0.20), (360, 0.05), (512, 0.03), (640, 0.03))
_NEAR_3_2 = (424, 425, 426, 428, 429)


def coco_like_sizes(n: int, *, seed: int = 0) -> list[tuple[int, int]]:
    """``n`` (w, h) sizes drawn from the mix in the module docstring."""
    rng = random.Random(seed)
    sizes = []
    for _ in range(n):
        u = rng.random()
        long = 640
        if u < 0.66:
            short = _pick_common(u)
        elif u < 0.76:
            short = rng.choice(_NEAR_3_2)
        elif u < 0.90:
            short = rng.randint(300, 479)
        else:
            long = rng.randint(300, 639)
            short = round(long * rng.uniform(0.6, 0.8))
        w, h = (long, short) if rng.random() >= 0.25 else (short, long)
        sizes.append((w, h))
    return sizes


def _pick_common(u: float) -> int:
    """The common short side that ``u`` in [0, 0.66) falls on, by the weights."""
    acc = 0.0
    for short, weight in _COMMON:
        acc += weight
        if u < acc:
            return short
    return _COMMON[-1][0]


def input_shape(
    size: tuple[int, int], min_size: int = 600, max_size: int = 1000
) -> tuple[int, int]:
    """The network input (Hs, Ws) of a (w, h) image under the Caffe scale rule."""
    w, h = size
    return resized_shape(h, w, compute_scale(h, w, min_size, max_size))


def batch_fill(sizes: list[tuple[int, int]], batch_size: int, *, mixed: bool) -> tuple[int, float]:
    """RoI-head calls and images per call when a job is cut into pieces of ``batch_size``.

    Per-shape batching (``mixed=False``, the extractor before mixed batches) runs one model
    call per distinct input shape of a piece; mixed batching shares one RoI-head call per piece.

    Returns:
        (calls, mean images per call).
    """
    calls = 0
    for start in range(0, len(sizes), batch_size):
        piece = sizes[start : start + batch_size]
        calls += 1 if mixed else len({input_shape(s) for s in piece})
    return calls, len(sizes) / max(calls, 1)
