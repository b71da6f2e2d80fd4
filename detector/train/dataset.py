"""Training samples: decoded, optionally flipped, Caffe-prepared images with scaled ground truth.

The data order is a pure function of ``(seed, iteration)``: image ``k`` of the run (counted
over iterations and ``ims_per_batch``) is ``perm(seed, epoch)[k mod n]`` and is flipped when a
coin drawn from ``(seed, k)`` says so. A resumed run therefore sees exactly the images the
uninterrupted run would have seen.

Shape glossary:
    G   ground-truth objects of one image
    Na  most attributes of any object in the image (attribute lists padded with -1)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from butd.detector.config import ExtractionConfig
from butd.detector.preprocess import prepare
from butd.detector.train.vg import VGImage
from butd.images import decode_image


@dataclass(frozen=True)
class TrainSample:
    """One image ready for a training step.

    Attributes:
        image: (3, Hs, Ws) float32 BGR, mean subtracted, resized (the test-time preparation).
        scale: resize factor s.
        gt_boxes: (G, 4) float32 in resized pixels (``original * s``).
        gt_classes: (G,) int64 in [1, K] (0-based vocabulary id + 1; 0 is background).
        gt_attributes: (G, Na) int64 0-based attribute ids, -1 padded.
        image_id: dataset id.
    """

    image: torch.Tensor
    scale: float
    gt_boxes: torch.Tensor
    gt_classes: torch.Tensor
    gt_attributes: torch.Tensor
    image_id: int

    @property
    def size(self) -> tuple[int, int]:
        """(Hs, Ws)."""
        return int(self.image.shape[1]), int(self.image.shape[2])


def flip_boxes(boxes: np.ndarray, width: int) -> np.ndarray:
    """Mirror (G, 4) inclusive-pixel boxes horizontally in an image ``width`` pixels wide.

    py-faster-rcnn ``append_flipped_images``: ``x1' = W - x2 - 1``, ``x2' = W - x1 - 1``.
    """
    out = boxes.copy()
    out[:, 0] = width - boxes[:, 2] - 1
    out[:, 2] = width - boxes[:, 0] - 1
    return out


def pad_attributes(attributes: Sequence[Sequence[int]]) -> torch.Tensor:
    """Attribute id lists -> (G, Na) int64 padded with -1 (Na >= 1)."""
    width = max([len(a) for a in attributes] + [1])
    out = torch.full((len(attributes), width), -1, dtype=torch.int64)
    for i, attrs in enumerate(attributes):
        out[i, : len(attrs)] = torch.tensor(list(attrs), dtype=torch.int64)
    return out


def load_sample(image: VGImage, config: ExtractionConfig, *, flip: bool) -> TrainSample:
    """Decodes, flips and prepares one image and scales its ground truth.

    Args:
        image: ground truth and file of the image.
        config: ``min_size``, ``max_size``, ``pixel_mean`` (the training scale).
        flip: mirror horizontally.
    """
    bgr = decode_image(image.path.read_bytes())
    boxes = image.boxes.astype(np.float32)
    if flip:
        bgr = np.ascontiguousarray(bgr[:, ::-1])
        boxes = flip_boxes(boxes, bgr.shape[1])
    prepared = prepare(bgr, config)
    return TrainSample(
        image=prepared.tensor,
        scale=prepared.scale,
        gt_boxes=torch.from_numpy(boxes) * prepared.scale,
        gt_classes=torch.from_numpy(image.classes.astype(np.int64)) + 1,
        gt_attributes=pad_attributes(image.attributes),
        image_id=image.image_id,
    )


def draw_for(k: int, num_images: int, seed: int, flip: bool) -> tuple[int, bool]:
    """(image index, flip) of the ``k``-th image drawn in a run (0-based, over all steps)."""
    epoch, position = divmod(k, num_images)
    order = np.random.default_rng([seed, epoch]).permutation(num_images)
    flipped = flip and bool(np.random.default_rng([seed, 1_000_003, k]).integers(0, 2))
    return int(order[position]), flipped


def draws_for_iteration(
    iteration: int, ims_per_batch: int, num_images: int, seed: int, flip: bool
) -> list[tuple[int, bool]]:
    """(image index, flip) of each image of one iteration."""
    start = iteration * ims_per_batch
    return [draw_for(start + j, num_images, seed, flip) for j in range(ims_per_batch)]
