"""``bench/gpu.py`` runs end to end on CPU (tiny model, tiny inputs) and writes its report.

Only the script's plumbing is checked here (every section ran and produced figures); the
figures themselves are measured on a GPU machine (docs/fidelity.md).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path: Path) -> None:
    from bench import gpu

    out = tmp_path / "gpu.md"
    argv = "--device cpu --tiny --batch 2 --mixed 2 --e2e 4 --repeats 1 --photos 2"
    written = gpu.main([*argv.split(), "--precisions", "fp32,bf16", "--out", str(out)])
    assert written == out
    text = out.read_text()
    for title in ("## tests/gpu", "## images/s of the extractor", "## end to end", "## fast modes"):
        assert title in text
    assert "random weights" in text  # the tiny model is untrained: said so
    section = text.split("## images/s")[1].split("## end to end")[0]
    rates = re.findall(r"^\| (fp32|bf16) \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|$", section, re.M)
    assert [r[0] for r in rates] == ["fp32", "bf16"] and all(float(x) > 0 for x in rates[0][1:])
    e2e = re.findall(r"^\| (fp32|bf16) \| 4 \| ([0-9.]+) \| ([0-9.]+) \|$", text, re.M)
    assert [r[0] for r in e2e] == ["fp32", "bf16"]
    dev = re.search(r"^\| bf16 \| (\d+)/(\d+) .*\| ([0-9.e+-]+) \| ([0-9.e+-]+) \|$", text, re.M)
    assert dev is not None and int(dev.group(2)) > 0
    if int(dev.group(1)):  # boxes bf16 kept identically: their features moved, a little
        assert 0 < float(dev.group(4)) <= float(dev.group(3)) < 0.5
    else:  # the random tiny model may keep none identically: then no error is claimed
        assert dev.group(3) == dev.group(4) == "-"
    assert re.search(r"^Total \d+ s\.$", text, re.M)
