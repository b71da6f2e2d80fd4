"""The bottom-up detector: Faster R-CNN ResNet-101 C4 with an attribute head (torch).

Public API: ``from butd.detector import Extractor`` (images in, ``FeatureRecord``s out). It is
imported on first use, so the torch-free modules of this package (``config``, ``vocab``) can be
imported without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from butd.detector.extractor import Extractor

__all__ = ["Extractor"]


def __getattr__(name: str) -> Any:
    if name == "Extractor":
        from butd.detector.extractor import Extractor

        return Extractor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
