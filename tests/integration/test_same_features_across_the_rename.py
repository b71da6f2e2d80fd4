"""The move to one import name (``butd.*``) changed no stored byte.

The same photos are extracted by ``butd extract`` twice on this machine: by the code as it was
before the move (commit ``BEFORE``, taken out of the git history, run under its old module names)
and by the working tree. Every dataset and attribute of the two feature files must be equal,
byte for byte (regions, features in float32, the 2 x 2 grid, vocabularies, ids, provenance).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
# The last commit with the top-level import names (service, store, workers, detector, heads).
BEFORE = "9dc31dad76dc122fc04de3e242c4ad4a41910f5b"
LAYERS = ["butd", "detector", "heads", "service", "store", "workers"]


def _checkout_before(dest: Path) -> None:
    has = subprocess.run(
        ["git", "cat-file", "-e", f"{BEFORE}^{{commit}}"], cwd=ROOT, capture_output=True
    )
    if has.returncode != 0:
        pytest.skip(f"needs the git history with commit {BEFORE[:10]} (a shallow clone lacks it)")
    archive = subprocess.run(
        ["git", "archive", "--format=tar", BEFORE, *LAYERS], cwd=ROOT, capture_output=True
    )
    assert archive.returncode == 0, archive.stderr
    dest.mkdir()
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)


def _extract(module: str, images: Path, out: Path, cwd: Path, pythonpath: str) -> None:
    argv = [sys.executable, "-m", module, "extract", str(images), "--out", str(out)]
    argv += ["--device", "cpu", "--float32", "--grid-size", "2", "--batch-size", "2"]
    env = {"PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1", "PATH": os.environ["PATH"]}
    env["HOME"] = os.environ.get("HOME", str(cwd))
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _contents(path: Path) -> dict[str, Any]:
    """Every dataset as (dtype, shape, bytes) and every attribute, by name."""
    found: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        found["/"] = {k: np.asarray(v).tobytes() for k, v in f.attrs.items()}

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                data = np.asarray(obj[()])
                # Strings come back as objects: their values, not their pointers.
                value = data.tolist() if data.dtype.kind == "O" else data.tobytes()
                found[name] = (obj.dtype.str, obj.shape, value)
            found[f"{name}@"] = {k: np.asarray(v).tobytes() for k, v in obj.attrs.items()}

        f.visititems(visit)
    return found


def test_extraction_bytes_are_the_same_before_and_after_the_move(tmp_path: Path) -> None:
    data = pytest.importorskip("skimage.data")
    before = tmp_path / "before"
    _checkout_before(before)
    images = tmp_path / "images"
    images.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(images / f"{name}.jpg", quality=92)

    old, new = tmp_path / "old.h5", tmp_path / "new.h5"
    _extract("service.cli.main", images, old, cwd=before, pythonpath=str(before))
    _extract("butd.cli.main", images, new, cwd=tmp_path, pythonpath=str(ROOT))

    a, b = _contents(old), _contents(new)
    assert sorted(a) == sorted(b)
    assert "features" in a and a["features"][0] == "<f4" and a["features"][1][0] > 30
    assert "grids" in a and a["grids"][1][1:3] == (2, 2)
    changed = sorted(name for name in a if a[name] != b[name])
    assert changed == []
