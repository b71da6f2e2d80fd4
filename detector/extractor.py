"""Images in, FeatureRecords out: the composition root of extraction.

Shape glossary:
    B   images run through the backbone together (equal resized shape, unpadded)
    P   proposals of one image (<= 300)
    N   regions kept by the selection rule (10..100 by default)
    D   feature size

    Extractor.extract:  decode already done (BGR uint8) -> prepare (mean, Caffe resize)
        -> group by resized shape -> Detector (backbone, RPN, RoI head) -> select (per-class NMS,
        max_conf, [min, max]) -> gather -> FeatureRecord per image.
        With ``config.grid_size`` G > 0 the same res4 map also gives each record a (G, G, D) grid
        (``Detector.grid``); the regions are computed exactly as without it.

Strict fp32 is the default and turns TF32 off on CUDA (ARCHITECTURE.md: TF32 moves features by
~1e-3 relative); fp16/bf16 are opt-in autocast modes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from butd.detector.config import ExtractionConfig, ModelSpec, model_version
from butd.detector.model import Detector, RegionOutputs
from butd.detector.preprocess import (
    PreparedImage,
    compute_scale,
    group_by_shape,
    prepare,
    stack_group,
    stage_pixels,
)
from butd.detector.select import select_regions
from butd.store.records import FeatureRecord

log = logging.getLogger(__name__)

# Registry name used when no weights are configured: the packaged demo model.
DEFAULT_WEIGHTS = "demo-synthetic"

# What ``Extractor.stage`` returns: a prepared image (CPU) or pinned uint8 pixels (CUDA).
Staged = PreparedImage | torch.Tensor


@dataclass(frozen=True)
class _Kept:
    """Device tensors of the kept regions of one image, before the one copy to the host."""

    boxes: torch.Tensor  # (N, 4) original pixels
    features: torch.Tensor  # (N, D)
    objects_conf: torch.Tensor  # (N,)
    objects_id: torch.Tensor  # (N,)
    attrs_conf: torch.Tensor  # (N,)
    attrs_id: torch.Tensor  # (N,)
    grid: torch.Tensor | None = None  # (G, G, D) when the config asks for grid features


class Extractor:
    """A loaded detector on one device, turning images into region records."""

    def __init__(
        self,
        model: Detector,
        *,
        config: ExtractionConfig,
        weights_sha256: str,
        device: str | torch.device = "cpu",
        batch_size: int = 8,
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.spec: ModelSpec = model.spec
        self.config = config
        self.weights_sha256 = weights_sha256
        self.batch_size = batch_size
        if self.device.type == "cuda" and config.precision == "fp32":
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    @classmethod
    def from_weights(
        cls,
        weights: str | Path | None = None,
        *,
        device: str | torch.device = "cpu",
        config: ExtractionConfig | None = None,
        batch_size: int = 8,
        **overrides: Any,
    ) -> Extractor:
        """Load a canonical weights file (path or registry name; None = the packaged demo).

        ``config`` defaults to the checkpoint's own extraction defaults; ``overrides`` replace
        single fields (``min_boxes=36, max_boxes=36``).
        """
        from butd.detector.weights import load, resolve

        loaded = load(resolve(DEFAULT_WEIGHTS if weights is None else weights))
        model = Detector(loaded.spec)
        model.load_state_dict(loaded.state_dict, strict=True)
        config = (config or loaded.spec.default_extraction()).replace(**overrides)
        return cls(
            model, config=config, weights_sha256=loaded.sha256, device=device, batch_size=batch_size
        )

    @property
    def model_version(self) -> str:
        """Cache key of the default configuration."""
        return self.version_for(self.config)

    def version_for(self, config: ExtractionConfig) -> str:
        return model_version(self.weights_sha256, config)

    def __call__(
        self, images: Sequence[np.ndarray], image_ids: Sequence[str]
    ) -> list[FeatureRecord]:
        return self.extract(images, image_ids)

    def extract(
        self,
        images: Sequence[np.ndarray | Staged],
        image_ids: Sequence[str],
        config: ExtractionConfig | None = None,
    ) -> list[FeatureRecord]:
        """Regions of each image (BGR uint8 (H, W, 3), or ``stage`` of it), in input order."""
        if len(images) != len(image_ids):
            raise ValueError(f"{len(images)} images but {len(image_ids)} ids")
        config = config or self.config
        start = time.perf_counter()
        prepared = [self._prepare(image, config) for image in images]
        records: list[FeatureRecord | None] = [None] * len(images)
        for batch in self._batches(prepared):
            kept = self._run_batch([prepared[i] for i in batch], config)
            for i, record in zip(
                batch, self._to_records(kept, prepared, batch, image_ids, config), strict=True
            ):
                records[i] = record
        log.debug("extracted %d images in %.3fs", len(images), time.perf_counter() - start)
        return [r for r in records if r is not None]

    def extract_with_boxes(
        self, image: np.ndarray, boxes: np.ndarray, image_id: str
    ) -> FeatureRecord:
        """Features, labels and attributes for caller-given boxes (N, 4), original pixels."""
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        prepared = prepare(image, self.config, device=self.device)
        scale = torch.tensor(prepared.scale, dtype=torch.float32, device=self.device)
        given = torch.from_numpy(boxes).to(self.device)
        with torch.inference_mode(), self._autocast(self.config):
            res4 = self.model.backbone(prepared.tensor[None].to(self.device))
            outputs = self.model.regions(res4, [given * scale])[0]
            index = torch.arange(len(boxes), device=self.device)
            kept = self._gather(outputs, index, scale, boxes=given)
            if self.config.grid_size:
                grid = self.model.grid(res4, self.config.grid_size)[0].float()
                kept = dataclasses.replace(kept, grid=grid)
        return self._to_records([kept], [prepared], [0], [image_id], self.config)[0]

    def stage(self, image: np.ndarray, config: ExtractionConfig | None = None) -> Staged:
        """The host-side part of preparing one image, for a loader thread
        (``butd.workers.pipeline``).

        On a CPU device, the whole Caffe preparation (mean, exact resize) under ``config``; on
        CUDA, the uint8 pixels in pinned memory (the float64 resize runs on the device, so the
        uint8 pixels are what crosses, asynchronously). ``extract`` with the same ``config``
        takes the result in place of the image and computes exactly what it computes from the
        image. Thread-safe: it touches no model state.
        """
        config = config or self.config
        if self.device.type == "cuda":
            return stage_pixels(image)
        return prepare(image, config, device=self.device)

    # -- steps ---------------------------------------------------------------------------

    def _prepare(self, image: np.ndarray | Staged, config: ExtractionConfig) -> PreparedImage:
        if isinstance(image, PreparedImage):
            expected = compute_scale(image.orig_h, image.orig_w, config.min_size, config.max_size)
            if image.scale != expected:
                raise ValueError(f"staged at scale {image.scale}; the config needs {expected}")
            return image
        # On a GPU the exact (float64) resize runs there: the uint8 pixels are what crosses.
        return prepare(image, config, device=self.device)

    def _batches(self, prepared: list[PreparedImage]) -> Iterator[list[int]]:
        """Batches of at most ``batch_size`` indices, equal resized shapes next to each other.

        A batch may hold several shapes: each shape group runs its own unpadded backbone and
        RPN, and the whole batch shares one RoI head call (``Detector.regions_mixed``), so a
        dataset of mixed shapes still fills every batch.
        """
        order = [i for group in group_by_shape(prepared) for i in group]
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size]

    def _run_batch(self, batch: list[PreparedImage], config: ExtractionConfig) -> list[_Kept]:
        """Kept regions of each image of ``batch`` (any mix of resized shapes), in order."""
        groups = group_by_shape(batch)
        scales = [p.scale for p in batch]
        with torch.inference_mode(), self._autocast(config):
            maps = [
                self.model.propose(
                    self._images([batch[i] for i in g]), [scales[i] for i in g], config
                )
                for g in groups
            ]
            outputs = [out for group in self.model.regions_mixed(maps) for out in group]
            order = [i for g in groups for i in g]  # outputs[k] is image order[k]
            kept: list[_Kept | None] = [None] * len(batch)
            for k, i in enumerate(order):
                kept[i] = self._select(outputs[k], scales[i], config)
            if config.grid_size:
                for g, (res4, _) in zip(groups, maps, strict=True):
                    grids = self.model.grid(res4, config.grid_size).float()  # (B_g, G, G, D)
                    for i, grid in zip(g, grids, strict=True):
                        kept[i] = dataclasses.replace(kept[i], grid=grid)
        return [k for k in kept if k is not None]

    def _images(self, group: list[PreparedImage]) -> torch.Tensor:
        """(B, 3, Hs, Ws) on the device: one shape group of a batch, stacked unpadded."""
        return stack_group(group).to(self.device, non_blocking=True)

    def _select(self, out: RegionOutputs, scale: float, config: ExtractionConfig) -> _Kept:
        """generate_tsv.py: per-class NMS on the proposals in original pixels, then gather."""
        s = torch.tensor(scale, dtype=torch.float32, device=out.boxes.device)
        boxes = out.boxes.float() / s  # (P, 4) original pixels (float32 division, as Caffe)
        cls_prob = out.cls_logits.float().softmax(dim=1)
        conv = self.spec.conventions
        selection = select_regions(
            boxes,
            cls_prob,
            nms_thresh=config.nms_thresh,
            conf_thresh=config.conf_thresh,
            min_boxes=config.min_boxes,
            max_boxes=config.max_boxes,
            plus_one=conv.plus_one,
            suppress_equal=conv.nms_suppress_equal,
        )
        return self._gather(out, selection.indices, s, cls_prob=cls_prob, boxes=boxes)

    def _gather(
        self,
        out: RegionOutputs,
        index: torch.Tensor,
        scale: torch.Tensor,
        *,
        cls_prob: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> _Kept:
        """Kept regions' boxes, features and LXMERT-style labels (0-based, bg / none dropped)."""
        if cls_prob is None:
            cls_prob = out.cls_logits.float().softmax(dim=1)
        if boxes is None:
            boxes = out.boxes.float() / scale
        obj_conf, obj_id = cls_prob[index, 1:].max(dim=1)
        attr_logits = out.attr_logits[index].float()
        if self.spec.conventions.attr_score == "softmax_all":
            attr_prob = attr_logits.softmax(dim=1)[:, 1:]
        else:  # airsplay / HF: renormalised over the real attributes
            attr_prob = attr_logits[:, 1:].softmax(dim=1)
        attr_conf, attr_id = attr_prob.max(dim=1)
        return _Kept(
            boxes[index], out.features[index].float(), obj_conf, obj_id, attr_conf, attr_id
        )

    def _to_records(
        self,
        kept: list[_Kept],
        prepared: list[PreparedImage],
        batch: list[int],
        image_ids: Sequence[str],
        config: ExtractionConfig,
    ) -> list[FeatureRecord]:
        """One host copy per field for the whole batch, then split into records."""
        counts = [int(k.boxes.shape[0]) for k in kept]
        splits = np.cumsum(counts)[:-1]
        host = {
            f: np.split(torch.cat([getattr(k, f) for k in kept]).cpu().numpy(), splits)
            for f in _FIELDS
        }
        version = self.version_for(config)
        grids: list[np.ndarray | None] = [None] * len(kept)
        if kept and kept[0].grid is not None:  # one host copy for the batch's grids
            grids = list(torch.stack([k.grid for k in kept if k.grid is not None]).cpu().numpy())
        return [
            FeatureRecord(
                image_id=str(image_ids[i]),
                image_w=prepared[i].orig_w,
                image_h=prepared[i].orig_h,
                boxes=host["boxes"][j].astype(np.float32, copy=False),
                features=host["features"][j].astype(np.float32, copy=False),
                objects_id=host["objects_id"][j].astype(np.int64, copy=False),
                objects_conf=host["objects_conf"][j].astype(np.float32, copy=False),
                attrs_id=host["attrs_id"][j].astype(np.int64, copy=False),
                attrs_conf=host["attrs_conf"][j].astype(np.float32, copy=False),
                model_version=version,
                grid=grids[j],
            )
            for j, i in enumerate(batch)
        ]

    def _autocast(self, config: ExtractionConfig) -> contextlib.AbstractContextManager[Any]:
        if config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if config.precision == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype)


_FIELDS = ("boxes", "features", "objects_conf", "objects_id", "attrs_conf", "attrs_id")
