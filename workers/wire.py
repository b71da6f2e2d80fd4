"""The binary form of an online result that carries its record, and model metadata (torch-free).

A worker answers an online request with the record it just computed, before sealing it
(``docs/workers.md``, "Reply, then seal"), so the gateway renders the response without opening
HDF5. The value LPUSHed onto ``result_key(request_id)`` is either

* a JSON ``OnlineResult`` (errors, expired requests, records already stored), or
* ``MAGIC | u32 LE header length | header JSON | array bytes``: the header holds
  ``{"result": <OnlineResult JSON>, "record": {image_id, image_w, image_h, model_version,
  "arrays": [[name, dtype, shape], ...]}}`` and the arrays follow in that order as raw C-order
  little-endian bytes (``boxes (N,4) <f4``, ``features (N,D) <f2|<f4`` as stored,
  ``objects_id (N,) <i8``, ``objects_conf (N,) <f4``, ``attrs_id (N,) <i8``,
  ``attrs_conf (N,) <f4``), then ``grid (G,G,D)`` as stored when the record has grid features.

``MAGIC`` starts with a NUL byte, which no JSON text does, so both forms share one key.
The record is sent in its stored form (``stored_form``): what the cache returns later is the
same bytes.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from butd.store.records import FeatureRecord
from butd.workers.protocol import OnlineResult, ProtocolError

MAGIC = b"\x00BUTD-R1"
_LEN = struct.Struct("<I")
ARRAYS = ("boxes", "features", "objects_id", "objects_conf", "attrs_id", "attrs_conf")
OPTIONAL_ARRAYS = ("grid",)


@dataclass(frozen=True)
class ModelMeta:
    """What the gateway needs to render records of one model version (``model_key``).

    Attributes:
        objects_vocab: names of the object ids.
        attributes_vocab: names of the attribute ids.
        description: human-readable description of the model.
    """

    objects_vocab: tuple[str, ...]
    attributes_vocab: tuple[str, ...]
    description: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, data: str | bytes) -> ModelMeta:
        raw = json.loads(data)
        try:
            return cls(
                objects_vocab=tuple(str(x) for x in raw["objects_vocab"]),
                attributes_vocab=tuple(str(x) for x in raw["attributes_vocab"]),
                description=str(raw.get("description", "")),
            )
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"bad model metadata: {exc}") from exc


def stored_form(record: FeatureRecord, feature_dtype: str) -> FeatureRecord:
    """``record`` with its features cast to the store's dtype, as a sealed shard holds them.

    Args:
        feature_dtype: "float16" or "float32" (the cast rounds to nearest, like the HDF5 writer).
    """
    dtype = np.dtype(feature_dtype)
    grid = record.grid
    if record.features.dtype == dtype and (grid is None or grid.dtype == dtype):
        return record
    return replace(
        record,
        features=record.features.astype(dtype),
        grid=None if grid is None else grid.astype(dtype),
    )


def encode_result(result: OnlineResult) -> bytes:
    """The value to LPUSH: JSON, or the binary form when the result carries a record."""
    rec = result.record
    if rec is None:
        return result.to_json().encode()
    specs: list[list[Any]] = []
    chunks: list[bytes] = []
    names = [*ARRAYS, *(n for n in OPTIONAL_ARRAYS if getattr(rec, n) is not None)]
    for name in names:
        array = getattr(rec, name)
        dtype = array.dtype.newbyteorder("<")
        specs.append([name, dtype.str, list(array.shape)])
        chunks.append(np.ascontiguousarray(array, dtype=dtype).tobytes())
    header = {
        "result": json.loads(result.to_json()),
        "record": {
            "image_id": rec.image_id,
            "image_w": rec.image_w,
            "image_h": rec.image_h,
            "model_version": rec.model_version,
            "arrays": specs,
        },
    }
    head = json.dumps(header).encode()
    return b"".join([MAGIC, _LEN.pack(len(head)), head, *chunks])


def decode_result(data: bytes | str) -> OnlineResult:
    """Inverse of ``encode_result`` (either form); arrays are read-only views of ``data``.

    Raises:
        ProtocolError: a malformed value.
    """
    if isinstance(data, str) or not data.startswith(MAGIC):
        return OnlineResult.from_json(data)
    try:
        start = len(MAGIC) + _LEN.size
        (size,) = _LEN.unpack_from(data, len(MAGIC))
        header = json.loads(data[start : start + size])
        result = OnlineResult.from_json(json.dumps(header["result"]))
        meta = header["record"]
        arrays = _arrays(data, start + size, meta["arrays"])
        record = FeatureRecord(
            image_id=str(meta["image_id"]),
            image_w=int(meta["image_w"]),
            image_h=int(meta["image_h"]),
            model_version=str(meta["model_version"]),
            **arrays,
        )
    except (KeyError, TypeError, ValueError, struct.error) as exc:
        raise ProtocolError(f"malformed binary result: {exc}") from exc
    return replace(result, record=record)


def _arrays(data: bytes, offset: int, specs: list[list[Any]]) -> dict[str, Any]:
    """The arrays named by ``specs`` laid out back to back from ``offset``."""
    out: dict[str, Any] = {}
    for name, dtype_str, shape in specs:
        if name not in ARRAYS and name not in OPTIONAL_ARRAYS:
            raise ValueError(f"unknown array {name!r}")
        dtype = np.dtype(dtype_str)
        count = int(np.prod(shape, dtype=np.int64))
        if count == 0:
            out[name] = np.empty(shape, dtype=dtype)
            continue
        out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} trailing bytes after the arrays")
    return out
