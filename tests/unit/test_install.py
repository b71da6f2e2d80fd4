"""``pip install .`` puts one import name into site-packages: ``butd``.

The wheel is built from the working tree and installed into a fresh virtual environment (no
dependencies: only what the project itself adds is listed). The layers keep their folders in the
repository (``service/``, ``store/``, ...) and are installed as ``butd.service``, ``butd.store``,
...; every module and packaged data file of those folders must be in the wheel under its new
name (the package list in pyproject.toml is explicit, so a forgotten subpackage would be
silently missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.unit.test_layers import FOLDERS, ROOT

DATA_FILES = {
    "detector/weights/vocab/objects_vocab.txt",
    "detector/weights/vocab/attributes_vocab.txt",
    "detector/weights/demo/butd-demo.safetensors",
    "heads/demo/README.md",
    "heads/demo/caption/last.pt",
    "heads/demo/vqa/last.pt",
}


def _installed_name(repo_path: str) -> str:
    """``service/app.py`` -> ``butd/service/app.py`` (``butd/cli/x.py`` stays as it is)."""
    folder, _, rest = repo_path.partition("/")
    package = next(n for n, f in FOLDERS.items() if f == folder)
    return f"{package.replace('.', '/')}/{rest}"


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", *args], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"needs the git checkout: {out.stderr.strip()}")
    return out.stdout.splitlines()


def _tracked(*patterns: str) -> list[str]:
    return _git_files("--", *patterns)


def _untracked() -> list[str]:
    return _git_files("--others", "--exclude-standard")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the working tree's files (tracked and new, not ignored), built from a copy:
    a developer's stale ``build/`` directory cannot leak into it."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for rel in _tracked() + _untracked():
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run(
        [*cmd, "-w", str(out), str(source)], check=True, capture_output=True, timeout=300
    )
    (found,) = out.glob("butd-*.whl")
    return found


def test_the_wheel_holds_every_module_and_data_file_under_butd(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"butd"}
    modules = _tracked(*(f"{f}/*.py" for f in FOLDERS.values()))
    assert len(modules) > 100
    missing = sorted(_installed_name(p) for p in modules if _installed_name(p) not in names)
    assert missing == []
    data = sorted(n for n in names if not n.endswith(".py") and ".dist-info/" not in n)
    assert data == sorted(_installed_name(p) for p in DATA_FILES)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "butd = butd.cli.main:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_a_fresh_venv_gets_butd_and_nothing_else_of_ours(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q"]
    subprocess.run([*install, str(wheel)], check=True, capture_output=True, timeout=300)
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    assert sorted(p.name for p in site.iterdir()) == ["butd", "butd-0.1.0.dist-info"]
    assert (venv / "bin" / "butd").exists()
    # From outside the repository, the new names resolve into site-packages, the old ones not.
    probe = (
        "import importlib.util as u, json; "
        "print(json.dumps({m: bool(u.find_spec(m)) for m in "
        "['butd.service.app', 'butd.store.ids', 'butd.cli.main', 'butd.detector.extractor', "
        "'service', 'store', 'workers', 'detector', 'heads']}))"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {
        "butd.service.app": True,
        "butd.store.ids": True,
        "butd.cli.main": True,
        "butd.detector.extractor": True,
        "service": False,
        "store": False,
        "workers": False,
        "detector": False,
        "heads": False,
    }


def test_the_public_import_paths() -> None:
    from butd.client import Client
    from butd.detector import Extractor
    from butd.detector.extractor import Extractor as Defined

    assert Extractor is Defined and Client.__module__ == "butd.client"
    # The detector package itself loads torch only when Extractor is asked for: its torch-free
    # modules (config, read by the workers' batcher) stay torch-free.
    code = "import sys, butd.detector, butd.detector.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
