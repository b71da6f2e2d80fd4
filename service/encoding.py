"""Render a stored record as JSON, .npz or .safetensors (torch-free).

Shapes: N regions, D feature size. Binary formats hold the arrays ``boxes (N,4) f32``,
``features (N,D) f16|f32``, ``objects_id``, ``attrs_id`` (N,) i64, ``objects_conf``,
``attrs_conf`` (N,) f32, ``image_size`` (2,) i64 = (w, h), and ``grid (G,G,D) f16|f32`` when the
record has grid features; the ids and provenance travel as
metadata (npz: 0-d string arrays; safetensors: the header's ``__metadata__``).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save as safetensors_save

from butd.store.records import StoredRecord

MediaType = Literal["application/json", "application/x-npz", "application/x-safetensors"]
JSON: MediaType = "application/json"
NPZ: MediaType = "application/x-npz"
SAFETENSORS: MediaType = "application/x-safetensors"
_BINARY: dict[str, MediaType] = {NPZ: NPZ, SAFETENSORS: SAFETENSORS}


def negotiate(accept: str | None) -> MediaType:
    """Pick the response format from an ``Accept`` header (JSON unless a binary type is named).

    Quality values are honoured: the acceptable type with the highest q wins, ties by order.
    """
    best: tuple[float, MediaType] = (0.0, JSON)
    for part in (accept or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for param in fields[1:]:
            if param.startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0
        if media in _BINARY and q > best[0]:
            best = (q, _BINARY[media])
        elif media in (JSON, "application/*", "*/*") and q > best[0]:
            best = (q, JSON)
    return best[1]


def _names(vocab: Sequence[str], ids: np.ndarray) -> list[str]:
    return [vocab[i] if 0 <= i < len(vocab) else str(i) for i in ids.tolist()]


def _metadata(stored: StoredRecord, extra: dict[str, Any]) -> dict[str, Any]:
    rec = stored.record
    meta = {
        "image_id": rec.image_id,
        "sha256": stored.sha256,
        "model_version": rec.model_version,
        "model": {"model_version": rec.model_version, "description": stored.description},
    }
    meta.update(extra)
    return meta


def to_json(stored: StoredRecord, dtype: str, extra: dict[str, Any]) -> dict[str, Any]:
    """JSON body of ``FeaturesResponse``; ``extra`` adds request_id, namespace, cached."""
    rec = stored.record
    body = _metadata(stored, extra)
    body.update(
        image_w=rec.image_w,
        image_h=rec.image_h,
        num_boxes=rec.num_boxes,
        boxes=rec.boxes.astype(np.float64).round(3).tolist(),
        objects_id=rec.objects_id.tolist(),
        objects=_names(stored.objects_vocab, rec.objects_id),
        objects_conf=rec.objects_conf.astype(np.float64).round(6).tolist(),
        attrs_id=rec.attrs_id.tolist(),
        attributes=_names(stored.attributes_vocab, rec.attrs_id),
        attrs_conf=rec.attrs_conf.astype(np.float64).round(6).tolist(),
        features=_b64_array(rec.features, dtype),
    )
    if rec.grid is not None:
        body["grid"] = _b64_array(rec.grid, dtype)
    return body


def _b64_array(array: np.ndarray, dtype: str) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<"))
    return {
        "dtype": dtype,
        "shape": list(data.shape),
        "encoding": "base64",
        "byte_order": "little",
        "data": base64.b64encode(data.tobytes()).decode("ascii"),
    }


def decode_features(features: dict[str, Any]) -> np.ndarray:
    """Inverse of the ``features`` (or ``grid``) field of ``to_json``: the array, stated dtype."""
    dtype = np.dtype(features["dtype"]).newbyteorder("<")
    raw = base64.b64decode(features["data"])
    return np.frombuffer(raw, dtype=dtype).reshape(features["shape"])


def _arrays(stored: StoredRecord, dtype: str) -> dict[str, np.ndarray]:
    rec = stored.record
    grid = {} if rec.grid is None else {"grid": np.ascontiguousarray(rec.grid, dtype=dtype)}
    return {
        "boxes": np.ascontiguousarray(rec.boxes, dtype=np.float32),
        "features": np.ascontiguousarray(rec.features, dtype=dtype),
        "objects_id": np.ascontiguousarray(rec.objects_id, dtype=np.int64),
        "objects_conf": np.ascontiguousarray(rec.objects_conf, dtype=np.float32),
        "attrs_id": np.ascontiguousarray(rec.attrs_id, dtype=np.int64),
        "attrs_conf": np.ascontiguousarray(rec.attrs_conf, dtype=np.float32),
        "image_size": np.array([rec.image_w, rec.image_h], dtype=np.int64),
        **grid,
    }


def to_npz(stored: StoredRecord, dtype: str, extra: dict[str, Any]) -> bytes:
    """An uncompressed .npz: the arrays above plus ``metadata`` (a 0-d JSON string)."""
    buf = io.BytesIO()
    meta = _metadata(stored, extra)
    meta["objects"] = _names(stored.objects_vocab, stored.record.objects_id)
    meta["attributes"] = _names(stored.attributes_vocab, stored.record.attrs_id)
    arrays: dict[str, Any] = {"metadata": np.array(json.dumps(meta)), **_arrays(stored, dtype)}
    np.savez(buf, **arrays)
    return buf.getvalue()


def to_safetensors(stored: StoredRecord, dtype: str, extra: dict[str, Any]) -> bytes:
    """A .safetensors file: the arrays above; metadata values are JSON strings."""
    meta = _metadata(stored, extra)
    meta["objects"] = _names(stored.objects_vocab, stored.record.objects_id)
    meta["attributes"] = _names(stored.attributes_vocab, stored.record.attrs_id)
    header = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return bytes(safetensors_save(_arrays(stored, dtype), metadata=header))
