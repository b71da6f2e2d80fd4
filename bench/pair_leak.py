"""How much colour-shape pairing survives mean pooling in the heads simulator (butd.heads.synth).

Two objects (c1, s1) and (c2, s2) versus the same colours and shapes paired the other way,
(c1, s2) and (c2, s1): the bag of attributes is identical, so a model that only sees unbound
attributes cannot tell them apart. The simulated regions are relu(colour + shape + noise), and
the sum of the two noise-free region vectors differs between the pairings. Printed per feature
size D, averaged over every choice of two colours and two shapes:

- rms: the difference per dimension;
- snr: a matched linear read-out of the summed vectors, ||difference|| / (sqrt(2) · noise),
  counting only the two regions' own noise (clutter and the 1/K of pooling scale both alike).

    python bench/pair_leak.py [--dims 128 2048]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from butd.heads.synth import SynthWorld


def pairing_difference(dim: int, seed: int = 0) -> tuple[float, float]:
    """(rms per dimension, matched-filter SNR), means over colour pairs × shape pairs."""
    world = SynthWorld(dim, seed)
    c, s = world.color_codes, world.shape_codes
    rms, snr = [], []
    for (i, j), (k, m) in itertools.product(
        itertools.combinations(range(len(c)), 2), itertools.combinations(range(len(s)), 2)
    ):
        bound = np.maximum(c[i] + s[k], 0) + np.maximum(c[j] + s[m], 0)
        swapped = np.maximum(c[i] + s[m], 0) + np.maximum(c[j] + s[k], 0)
        diff = bound - swapped
        rms.append(float(np.sqrt(np.mean(diff**2))))
        snr.append(float(np.linalg.norm(diff) / (np.sqrt(2) * world.noise)))
    return float(np.mean(rms)), float(np.mean(snr))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dims", type=int, nargs="+", default=[128, 2048])
    args = p.parse_args()
    for dim in args.dims:
        rms, snr = pairing_difference(dim)
        sys.stdout.write(f"D={dim:5d}  rms per dimension {rms:.3f}  matched-filter SNR {snr:.1f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
