"""The gateway and the client never import torch (nor detector / heads), even transitively."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    "butd.service.app",
    "butd.service.adapters",
    "butd.client",
    "butd.client",
    "butd.cli.serve",
    "butd.cli.jobs",
    "butd.service.embedded",
)


@pytest.mark.parametrize("module", MODULES)
def test_module_does_not_import_torch(module: str) -> None:
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', "
        "'detector', 'heads')); print(','.join(bad))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"


def test_create_app_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from butd.service.app import create_app; "
        "from butd.service.settings import Settings; "
        f"create_app(Settings(store_dir={str(tmp_path)!r}, redis_url='redis://x')); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
