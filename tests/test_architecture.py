"""The shape of the packages, kept by tests.

For every package (mtp_core, mtp_numpy, mtp_torch): no import cycle between its modules (lazy
imports counted), no function over 90 lines, no module over 600 lines, and no import of a
package after it (the core imports neither backend; mtp_numpy and mtp_torch import only the
core).  For mtp_torch: its layers import only layers below them (``LAYERS``), and
``import mtp_torch`` stays light.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "backends" / "torch" / "mtp_torch"
PACKAGES = (ROOT / "mtp_core", ROOT / "backends" / "numpy" / "mtp_numpy", PACKAGE)
MAX_FUNCTION_LINES = 90
MAX_MODULE_LINES = 600

# mtp_torch's layers, bottom first.  A module may import its own layer's modules and those of
# any layer below; layers that share a tier (``training`` and ``bench``) import neither each
# other.  The package's ``__init__`` (the public names) is above them all.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("_resources", "dtypes", "text"),
    ("jsonl",),  # reads through text's UTF-8 decoding
    ("decoding",),
    ("weights",),
    ("training", "bench"),
    ("integrations",),
    ("cli",),
)


def _modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The mtp_torch modules that ``name`` imports anywhere in its body (lazy imports included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
    return {t for t in targets if t in known and t != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _import_graph(package: Path) -> dict[str, set[str]]:
    modules = _modules(package)
    known = set(modules)
    # A package's __init__ re-exporting its children is not a cycle: the children never need
    # their package's __init__ to run first for anything but the package object itself.
    graph = {
        name: {t for t in _imported(name, path, known) if not name.startswith(t + ".")}
        for name, path in modules.items()
    }
    return {
        name: {t for t in targets if not (modules[t].name == "__init__.py" and t in name)}
        for name, targets in graph.items()
    }


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_no_import_cycle_between_modules(package: Path) -> None:
    graph = _import_graph(package)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def _tier(module: str) -> tuple[int, str] | None:
    """``(tier, layer)`` of an mtp_torch module; ``None`` for the package's own ``__init__``."""
    parts = module.split(".")
    if len(parts) < 2:
        return None
    for tier, layers in enumerate(LAYERS):
        if parts[1] in layers:
            return tier, parts[1]
    raise AssertionError(f"{module} is in no layer: add {parts[1]!r} to LAYERS")


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, targets in sorted(graph.items()):
        source = _tier(name)
        for target in sorted(targets):
            dest = _tier(target)
            if source is None or dest is None or source[1] == dest[1]:
                continue
            if dest[0] >= source[0]:
                found.append(f"{name} imports {target}")
    return found


# The packages' own order: a package imports only those before it (the core none).
PACKAGE_ORDER = ("mtp_core", "mtp_numpy", "mtp_torch")


def _packages_imported(package: Path) -> set[str]:
    """The packages of ``PACKAGE_ORDER`` that ``package``'s modules import (lazily or not)."""
    found: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                found.add(node.module.split(".")[0])
    return found & set(PACKAGE_ORDER)


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_packages_import_only_packages_before_them(package: Path) -> None:
    allowed = set(PACKAGE_ORDER[: PACKAGE_ORDER.index(package.name) + 1])
    # mtp_torch executes plans itself; it has no use for the numpy reference.
    if package.name == "mtp_torch":
        allowed.discard("mtp_numpy")
    assert _packages_imported(package) <= allowed, sorted(_packages_imported(package) - allowed)


def test_layers_import_only_layers_below() -> None:
    upward = _upward_imports(_import_graph(PACKAGE))
    assert not upward, "move the shared code down to a layer both can import: " + "; ".join(upward)


def test_the_layer_check_can_fail() -> None:
    graph = {
        "mtp_torch.decoding.model": {"mtp_torch.weights.default", "mtp_torch.text"},
        "mtp_torch.bench.prompts": {"mtp_torch.training.data"},
        "mtp_torch.cli.app": {"mtp_torch.bench.runner", "mtp_torch.cli.options"},
    }
    assert _upward_imports(graph) == [
        "mtp_torch.bench.prompts imports mtp_torch.training.data",
        "mtp_torch.decoding.model imports mtp_torch.weights.default",
    ]


@pytest.mark.parametrize(
    "path",
    sorted(path for package in PACKAGES for path in package.rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_functions_and_modules_stay_small(path: Path) -> None:
    source = path.read_text()
    lines = len(source.splitlines())
    assert lines <= MAX_MODULE_LINES, f"{lines} lines: split the module by concern"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"split these into steps: {long}"


def test_the_cycle_check_can_fail() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_import_mtp_torch_loads_no_benchmark_resource_or_matplotlib() -> None:
    code = (
        "import sys, mtp_torch; "
        "heavy = sorted(m for m in sys.modules if m.startswith('mtp_torch.bench') "
        "or m.startswith('mtp_torch.cli') or m in ('resource', 'matplotlib')); "
        "print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_decoding_reaches_the_default_model_through_the_loader_weights_registers() -> None:
    # decoding never imports weights; importing any mtp_torch module runs mtp_torch/__init__,
    # which imports weights/default.py, which registers the loader from_pretrained asks.
    code = (
        "from mtp_torch.decoding.named import _LOADERS, load_named; "
        "from mtp_torch.weights.default import load_named as weights_loader; "
        "print(_LOADERS == [weights_loader], load_named('not-a-default-name'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "True None", result.stdout
