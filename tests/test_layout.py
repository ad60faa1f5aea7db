"""The package's layout: imports go one way down the layers, without cycles; the reference oracle is
imported by no implementation module; no module is over 500 lines."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import resflow_cuda

PACKAGE_DIR = Path(resflow_cuda.__file__).parent
MAX_LINES = 500

# Bottom to top: a module may import modules of its own layer or of any layer below it. The oracle
# sits alone at the bottom (it imports nothing of the package); the package's __init__ is the top.
LAYERS = [
    ("reference", ["resflow_cuda.reference"]),
    ("extension", ["resflow_cuda.version", "resflow_cuda._C", "resflow_cuda._extension"]),
    ("ops", ["resflow_cuda.ops", "resflow_cuda.dense_ops", "resflow_cuda.step_ops", "resflow_cuda.flow_ops"]),
    ("functional / solvers", ["resflow_cuda.functional", "resflow_cuda.solvers"]),
    ("estimators", ["resflow_cuda.estimators"]),
    ("linearize", ["resflow_cuda.linearize", "resflow_cuda.dense_block"]),
    ("logdet", ["resflow_cuda.logdet"]),
    ("nn", ["resflow_cuda.nn"]),
    ("models", ["resflow_cuda.models"]),
    ("integrations", ["resflow_cuda.integrations"]),
    ("package", ["resflow_cuda"]),
]
REFERENCE = "resflow_cuda.reference"
REFERENCE_IMPORTERS = {"resflow_cuda"}  # the package's __init__ exposes it as an attribute


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    # An installed package also holds resflow_cuda.benchmarks (the resflow-bench command, from
    # benchmarks/): tests and benchmarks may import the reference, so it is not part of the graph.
    return {name: p for p in sorted(PACKAGE_DIR.rglob("*.py"))
            if not (name := _module_name(p)).startswith("resflow_cuda.benchmarks")}


def _resolve(name: str, alias: str | None, known: set[str]) -> str:
    """``from name import alias``: the submodule when alias is one, else the module itself."""
    if alias is not None and f"{name}.{alias}" in known:
        return f"{name}.{alias}"
    return name


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports (anywhere in the file, also inside functions)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.update(_resolve(module, a.name, known) for a in node.names)
    return {m for m in found if m == "resflow_cuda" or m.startswith("resflow_cuda.")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules) | {"resflow_cuda._C"}
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _layer(module: str) -> tuple[int, str]:
    best = None
    for rank, (layer, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[2]):
                best = (rank, layer, len(prefix))
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best[0], best[1]


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state:
                found = visit(succ)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for module, targets in sorted(graph.items()):
        rank, layer = _layer(module)
        for target in sorted(targets):
            target_rank, target_layer = _layer(target)
            if target_rank > rank:
                problems.append(f"{module} (layer {layer}) imports {target} (layer {target_layer}), a higher layer")
    return problems


def _reference_importers(graph: dict[str, set[str]]) -> list[str]:
    return sorted(m for m, targets in graph.items() if REFERENCE in targets and m not in REFERENCE_IMPORTERS)


def test_the_import_graph_has_no_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_imports_go_down_the_layers():
    problems = _upward_imports(_graph())
    assert not problems, "\n".join(problems)


def test_no_implementation_module_imports_the_reference():
    importers = _reference_importers(_graph())
    assert not importers, f"{', '.join(importers)} import(s) {REFERENCE}, which is for tests and benchmarks only"


def test_every_module_is_at_most_500_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    long = {str(p.relative_to(benchmarks)): n for p in benchmarks.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"benchmark modules over {MAX_LINES} lines: {long}"


def test_the_checks_find_a_cycle_an_upward_import_and_a_reference_import():
    graph = {
        "resflow_cuda.nn.a": {"resflow_cuda.logdet"},
        "resflow_cuda.logdet": {"resflow_cuda.nn.a", "resflow_cuda.reference"},
    }
    assert _cycle(graph) == ["resflow_cuda.logdet", "resflow_cuda.nn.a", "resflow_cuda.logdet"]
    assert _upward_imports(graph) == [
        "resflow_cuda.logdet (layer logdet) imports resflow_cuda.nn.a (layer nn), a higher layer"]
    assert _reference_importers(graph) == ["resflow_cuda.logdet"]


def test_relative_imports_resolve_to_modules():
    graph = _graph()
    assert "resflow_cuda.linearize" in graph["resflow_cuda.logdet"]
    assert "resflow_cuda.nn.lipschitz" in graph["resflow_cuda.nn.lop"]
    assert "resflow_cuda.logdet" in graph["resflow_cuda.nn"]
    assert "resflow_cuda._C" in graph["resflow_cuda._extension"]
    assert REFERENCE in graph["resflow_cuda"]


def test_normflows_layers_take_the_fast_path_without_importing_the_adapter():
    """``import resflow_cuda`` does not import normflows; once the user has, linearize() imports the
    adapter that registers normflows' layers."""
    pytest.importorskip("normflows")
    code = "\n".join([
        "import sys",
        "import resflow_cuda",
        "assert 'normflows' not in sys.modules",
        "import normflows",
        "from resflow_cuda.linearize import linearize",
        "assert 'resflow_cuda.integrations.normflows' not in sys.modules",
        "assert linearize(normflows.nets.LipschitzMLP([2, 4, 2])) is not None",
        "assert 'resflow_cuda.integrations.normflows' in sys.modules",
    ])
    root = str(PACKAGE_DIR.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_csrc_top_level_holds_only_the_entry_points():
    # Per-op checks, host loops, composite ops and the emulator live in folders named for their role;
    # the public include folder holds the torch-free math only (the emulator is test infrastructure).
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    top_files = {p.name for p in csrc.iterdir() if p.is_file()}
    assert top_files == {"registration.cpp", "module.cpp", "version.cpp", "version.h"}, top_files
    assert {p.name for p in csrc.iterdir() if p.is_dir()} == {"checks", "composite", "cpu", "cuda", "emulation",
                                                             "host", "include"}
    assert not list((csrc / "include").rglob("*emulat*")), "the CUDA emulator is not part of the public headers"
    assert (csrc / "emulation" / "emulator.h").is_file()
