"""The layout: the top level holds the tutorial and what a user runs, the machinery one
package; imports run one way (no circles); the tutorial's model, loss and notebook call
none of the machinery; and no module is over 300 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

TOP_LEVEL = {"dataset", "network", "pictures", "train", "cvae_tensorflow", "evaluate", "export", "explore",
             "generate"}
SOURCES = sorted([*ROOT.glob("*.py"), *ROOT.glob("machinery/*.py"), *ROOT.glob("benchmarks/*.py")])


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path) for path in SOURCES}


def project_imports(path: Path) -> set[str]:
    """The project's modules that `path` imports (`from machinery import cli` is machinery.cli)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names |= {f"{node.module}.{alias.name}" for alias in node.names} | {node.module}
    return {name for name in names if name in MODULES} - {module_name(path)}


GRAPH = {module_name(path): project_imports(path) for path in SOURCES}


def test_the_top_level_holds_the_tutorial_and_one_package():
    assert {path.stem for path in ROOT.glob("*.py")} == TOP_LEVEL
    packages = {path.parent.name for path in ROOT.glob("*/__init__.py")}
    assert packages == {"machinery"}


def test_imports_run_one_way():
    placed: set[str] = set()
    while len(placed) < len(GRAPH):  # peel off, layer by layer, what imports only what is placed
        layer = {name for name, imports in GRAPH.items() if name not in placed and imports <= placed}
        assert layer, f"an import circle among {sorted(set(GRAPH) - placed)}"
        placed |= layer
    assert GRAPH["machinery"] == set() and GRAPH["machinery.cli"] <= {"machinery"}
    assert "train" not in set().union(*(GRAPH[name] for name in GRAPH if name.startswith("machinery")))
    # The machinery imports none of the tutorial's modules: a run's data and model are read
    # and built above it (dataset.load_run_data, export.new_model), from its RunSettings.
    upward = {name: GRAPH[name] & {"dataset", "network", "pictures"} for name in GRAPH
              if name.startswith("machinery")}
    assert {name: found for name, found in upward.items() if found} == {}
    assert "train" not in GRAPH["evaluate"] | GRAPH["pictures"] | GRAPH["export"]


def test_the_tutorials_code_calls_none_of_the_machinery():
    # network.py imports machinery.cli, files and model_size for its command line alone (python network.py).
    assert GRAPH["network"] == {"machinery", "machinery.cli", "machinery.files", "machinery.model_size"}
    source = (ROOT / "network.py").read_text()
    tutorial_part = source[:source.index("# python network.py: what the model looks like")]
    mentions = [line for line in tutorial_part.splitlines() if re.search(r"machinery|\bcli\b", line)]
    assert len(mentions) == 1, mentions
    assert mentions[0].startswith("from machinery import cli, files, model_size  #"), mentions
    assert GRAPH["cvae_tensorflow"] == set()  # the notebook stands alone


def test_no_module_is_over_300_lines():
    lengths = {str(path.relative_to(ROOT)): len(path.read_text().splitlines()) for path in SOURCES}
    assert max(lengths.values()) <= 300, lengths


def test_what_network_py_builds_is_what_runs():
    """No layer's class changed at run time and no private TensorFlow module, anywhere."""
    for path in SOURCES + sorted(ROOT.glob("tests/*.py")):
        source = path.read_text()
        for banned in ("__class__ =", "tensorflow.python", "pfor", "vectorized_map"):
            assert banned not in source or path.name == "test_layout.py", (path.name, banned)
