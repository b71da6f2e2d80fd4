"""The layers' arrows (docs/architecture.md): which package may import which, and no cycles.

Two independent checks over every module of the repository's packages:

* static: every ``import`` / ``from ... import`` (module level, inside functions, under
  ``TYPE_CHECKING``) and every ``importlib.import_module`` / ``__import__`` with a literal name
  (or an f-string's literal prefix), read with ``ast``: a lazy import is still an arrow;
* at run time: a fresh interpreter imports every module of a layer and lists ``sys.modules``,
  which also sees names computed at run time and third-party packages that pull torch in.

The gateway's own run-time check (no torch behind the app, client and serve commands) is
tests/unit/test_app_imports.py.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Import name -> repository folder (pyproject.toml [tool.setuptools] package-dir).
FOLDERS = {
    "butd": "butd",
    "butd.detector": "detector",
    "butd.heads": "heads",
    "butd.service": "service",
    "butd.store": "store",
    "butd.workers": "workers",
}
TORCH = {"torch", "torchvision"}
# The pre-rename top-level names: nothing may import them (they are not installed).
OLD_NAMES = {"detector", "heads", "service", "store", "workers"}
# Layer -> packages it must never import. The command line (``butd.cli``) is the composition
# root and may import every layer; ``butd.service`` is the gateway; ``butd.client`` is the
# HTTP client (the wire format from the gateway, records from the store).
_ABOVE_STORE = {"butd.detector", "butd.workers", "butd.service", "butd.heads", "butd.cli"}
FORBIDDEN = {
    "store": TORCH | _ABOVE_STORE | {"butd.client"},
    "detector": {"butd.workers", "butd.service", "butd.heads", "butd.cli", "butd.client"},
    "heads": {"butd.service", "butd.workers", "butd.detector", "butd.cli", "butd.client"},
    "workers": {"butd.service", "butd.cli", "butd.client"},
    "gateway": TORCH | {"butd.detector", "butd.heads", "butd.cli", "butd.client"},
    "client": TORCH | {"butd.detector", "butd.heads", "butd.workers", "butd.cli"},
    # Image decoding (``butd.images``) is the shared edge every layer may import: it imports none.
    "images": TORCH | _ABOVE_STORE | {"butd.store", "butd.client"},
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """The import name of a repository file (``service/app.py`` -> ``butd.service.app``)."""
    rel = path.relative_to(root)
    package = next(n for n, folder in FOLDERS.items() if rel.parts[0] == folder)
    parts = [*package.split("."), *rel.with_suffix("").parts[1:]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """``butd.store.h5`` -> ``store``; ``butd.service.*`` -> ``gateway``; ``butd`` -> ``butd``."""
    parts = module.split(".")
    if parts[0] != "butd":
        return parts[0]
    second = parts[1] if len(parts) > 1 else "butd"
    return {"service": "gateway"}.get(second, second)


def _banned(name: str, banned: set[str]) -> bool:
    return any(name == b or name.startswith(f"{b}.") for b in banned)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(tree: ast.AST, *, typing: bool, lazy: bool) -> Iterator[ast.AST]:
    """Every node, less ``if TYPE_CHECKING:`` bodies (``typing=False``) and function bodies
    (``lazy=False``: what runs at import time)."""
    for node in ast.iter_child_nodes(tree):
        if not typing and isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                yield child
                yield from _walk(child, typing=typing, lazy=lazy)
            continue
        if not lazy and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from (n for d in getattr(node, "decorator_list", []) for n in ast.walk(d))
            continue
        yield node
        yield from _walk(node, typing=typing, lazy=lazy)


def _literal_prefix(arg: ast.expr) -> str | None:
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".") or None
    return None


def imported_names(
    source: str, module: str, *, is_package: bool, typing: bool = True, lazy: bool = True
) -> set[str]:
    """Dotted names ``module`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    names: set[str] = set()
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in _walk(ast.parse(source), typing=typing, lazy=lazy):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join([*base, *([node.module] if node.module else [])])
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            prefix = _literal_prefix(node.args[0])
            if called in ("import_module", "__import__") and prefix:
                names.add(prefix)
    return names


def repository_modules(root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(path, root): path
        for folder in FOLDERS.values()
        for path in sorted((root / folder).rglob("*.py"))
    }


def import_graph(*, typing: bool, lazy: bool = True, root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> names it imports (see :func:`_walk` for ``typing`` and ``lazy``)."""
    return {
        name: imported_names(
            path.read_text(encoding="utf-8"),
            name,
            is_package=path.name == "__init__.py",
            typing=typing,
            lazy=lazy,
        )
        for name, path in repository_modules(root).items()
    }


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, names in sorted(graph.items()):
        banned = FORBIDDEN.get(layer_of(module), set()) | OLD_NAMES
        bad.extend(f"{module} -> {n}" for n in sorted(names) if _banned(n, banned))
    return bad


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import cycles between repository modules (a ``from pkg import sub`` edge goes to
    ``pkg.sub`` only, so a package re-exporting its submodules is no cycle)."""
    edges = {
        m: {n for n in names if n in graph and not f"{m}.".startswith(f"{n}.")}
        for m, names in graph.items()
    }
    for m, targets in edges.items():  # ``from pkg import sub``: the edge is pkg.sub's
        edges[m] = {t for t in targets if not any(o.startswith(f"{t}.") for o in targets)}
    found, done = [], set()
    for start in sorted(edges):
        stack, path = [(start, iter(sorted(edges[start])))], [start]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                done.add(node)
            elif child in path:
                found.append(path[path.index(child) :])
            elif child not in done:
                stack.append((child, iter(sorted(edges[child]))))
                path.append(child)
    return found


def test_module_names_follow_the_package_dir_mapping() -> None:
    assert module_name(ROOT / "service" / "app.py") == "butd.service.app"
    assert module_name(ROOT / "butd" / "cli" / "__init__.py") == "butd.cli"
    assert module_name(ROOT / "detector" / "model" / "rpn.py") == "butd.detector.model.rpn"
    assert [layer_of(m) for m in ("butd.service.app", "butd.cli.main", "butd", "butd.store")] == [
        "gateway",
        "cli",
        "butd",
        "store",
    ]


def test_the_scanner_sees_every_kind_of_import() -> None:
    source = (
        "from __future__ import annotations\nimport importlib\nfrom typing import TYPE_CHECKING\n"
        "from . import sibling\nfrom ..up import thing\n"
        "if TYPE_CHECKING:\n    import butd.heads.vqa\n"
        "def f():\n    import torch.nn\n    importlib.import_module('butd.service.app')\n"
        "    return importlib.import_module(f'butd.workers.{1}')\n"
        "import workers.queue\n"
    )
    module = "butd.store.sub.mod"
    found = imported_names(source, module, is_package=False)
    assert {"butd.store.sub.sibling", "butd.store.up.thing", "butd.heads.vqa", "torch.nn"} <= found
    assert {"butd.service.app", "butd.workers", "workers.queue"} <= found
    runtime = imported_names(source, module, is_package=False, typing=False)
    assert "butd.heads.vqa" not in runtime and "torch.nn" in runtime
    at_import = imported_names(source, module, is_package=False, lazy=False)
    assert "butd.heads.vqa" in at_import and not {"torch.nn", "butd.service.app"} & at_import
    names = ("butd.heads.vqa", "butd.service.app", "butd.workers", "torch.nn", "workers.queue")
    assert forbidden_arrows({module: found}) == [f"{module} -> {n}" for n in names]
    # The layer above may import what the store may not, but never a pre-rename name.
    assert forbidden_arrows({"butd.cli.x": found}) == ["butd.cli.x -> workers.queue"]


def test_no_forbidden_arrow_in_any_module() -> None:
    graph = import_graph(typing=True)
    layers = {"store", "detector", "heads", "workers", "gateway", "cli", "client"}
    assert layers <= {layer_of(m) for m in graph}
    assert forbidden_arrows(graph) == []


def test_no_import_cycle_at_import_time() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.s"}, "p.s": {"p"}}) == [
        ["a", "b", "c"]
    ]
    assert cycles(import_graph(typing=False, lazy=False)) == []


def test_detector_has_no_import_cycle_even_through_function_level_imports() -> None:
    # evaluate_weights once imported train.detect inside the function, which imported evaluate.
    graph = {m: n for m, n in import_graph(typing=False).items() if layer_of(m) == "detector"}
    assert len(graph) > 20 and cycles(graph) == []


def _layer_modules(layer: str) -> list[str]:
    return [
        m
        for m, path in repository_modules().items()
        if layer_of(m) == layer and path.name != "__main__.py"
    ]


@pytest.mark.parametrize("layer", ["images", "store", "detector", "heads"])
def test_importing_a_whole_layer_loads_no_forbidden_package(layer: str) -> None:
    modules = _layer_modules(layer)
    banned = sorted(FORBIDDEN[layer] | OLD_NAMES)
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"banned = {banned!r}\n"
        "print(','.join(sorted(m for m in sys.modules"
        " if any(m == b or m.startswith(b + '.') for b in banned))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {layer} loaded {out.stdout.strip()}"
