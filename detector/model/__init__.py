"""The network: backbone, RPN and RoI head composed into ``Detector``."""

from butd.detector.model.detector import Detector, RegionOutputs

__all__ = ["Detector", "RegionOutputs"]
