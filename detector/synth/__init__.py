"""Synthetic scene sets in the Visual Genome layout, with captions and VQA pairs.

``write_synthetic_set(out, num_images, seed)`` is what ``butd synth`` runs.
"""

from butd.detector.synth.scenes import ATTRIBUTES, SHAPES, SceneParams
from butd.detector.synth.writer import SynthSummary, write_synthetic_set

__all__ = ["ATTRIBUTES", "SHAPES", "SceneParams", "SynthSummary", "write_synthetic_set"]
