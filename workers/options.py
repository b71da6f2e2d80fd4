"""Per-request extraction options: the one class the gateway and the workers share (torch-free).

``ExtractOptions`` is a frozen pydantic model: its fields and their bounds are the only
statement of the rules, and it is validated once where options enter a process:

* the gateway parsing an HTTP request (the query / form fields of ``POST /v1/features``, the
  ``options`` of a job request; the model is also their OpenAPI schema);
* a worker reading the wire (``butd.workers.protocol.decode_options``: the ``options`` field
  of a stream entry or of a job hash), which reports a bad value as a ``ProtocolError``.

Inside a process the value is trusted: the gateway puts it on the wire as it is (``to_json``,
byte-compatible with every earlier version), a worker groups a batch by it (it is hashable) and
hands ``overrides()`` to ``ExtractionConfig.replace`` (which still checks the result against the
worker's own defaults: ``min_boxes`` 50 against a default ``max_boxes`` of 36).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

# Most regions a request may ask for, per image (an API limit: the model could keep more).
MAX_BOXES = 1000
# Largest grid side a request may ask for (butd.detector.config.MAX_GRID_SIZE; torch-free copy).
MAX_GRID_SIZE = 32


class ExtractOptions(BaseModel):
    """Per-request selection options; None = the worker's extraction config.

    Any option set makes a different ``model_version`` (it is part of the cache key), so such a
    request always reaches a worker; the response names the version it was computed under.
    """

    # The docstring above is the OpenAPI description clients see: keep it as it is.
    model_config = ConfigDict(frozen=True)

    min_boxes: int | None = Field(
        default=None, ge=1, le=MAX_BOXES, description="fewest regions kept"
    )
    max_boxes: int | None = Field(default=None, ge=1, le=MAX_BOXES, description="most regions kept")
    conf_thresh: float | None = Field(
        default=None, ge=0.0, le=1.0, description="class-confidence threshold of the 10-100 rule"
    )
    grid_size: int | None = Field(
        default=None,
        ge=0,
        le=MAX_GRID_SIZE,
        description="also return a G x G grid of res5 features from the same pass (0 = none)",
    )

    @model_validator(mode="after")
    def _ordered(self) -> ExtractOptions:
        lo, hi = self.min_boxes, self.max_boxes
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"need min_boxes <= max_boxes; got {lo} > {hi}")
        return self

    def overrides(self) -> dict[str, Any]:
        """The fields that are set, for ``ExtractionConfig.replace(**overrides)``."""
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def to_json(self) -> str:
        """The wire form: the fields that are set, keys sorted (``{}`` for none)."""
        return json.dumps(self.overrides(), sort_keys=True)


def bounds(name: str) -> tuple[float, float]:
    """The inclusive range of the option ``name``, as its field declares it."""
    lo = hi = float("nan")
    for rule in ExtractOptions.model_fields[name].metadata:
        lo = getattr(rule, "ge", lo)
        hi = getattr(rule, "le", hi)
    return lo, hi
