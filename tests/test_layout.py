"""The layout: imports run one way, downward (no circles); the speed-ups know nothing of
the model or the loop; evaluate.py uses the modules, not train.py's insides; and no
module is over 300 lines."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("benchmarks/*.py")])
MODULES = {path.stem for path in SOURCES}


def project_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return (names & MODULES) - {path.stem}


def test_imports_run_one_way():
    graph = {path.stem: project_imports(path) for path in SOURCES}
    placed: set[str] = set()
    while len(placed) < len(graph):  # peel off, layer by layer, what imports only what is placed
        layer = {name for name, imports in graph.items() if name not in placed and imports <= placed}
        assert layer, f"an import circle among {sorted(set(graph) - placed)}"
        placed |= layer
    assert not graph["cli"]
    assert graph["speedups"] <= {"cli"}
    assert "train" not in graph["evaluate"] | graph["run_folder"] | graph["run_log"] | graph["pictures"]
    assert {name for name, imports in graph.items() if "train" in imports} <= {
        "cvae_tensorflow", "benchmark", "variants"}


def test_no_module_is_over_300_lines():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in SOURCES}
    assert max(lengths.values()) <= 300, lengths
