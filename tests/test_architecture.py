"""The package layout of docs/architecture.md: at most 12 top-level modules, no import
cycles (imports inside functions count), and every import goes down the layers.

Imports are read with ``ast``, so the check covers imports that only run in some
branches, inside functions or under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fxstream"

# Each entry may import the entries of lower layers, and its own package. This is the
# table of docs/architecture.md.
LAYERS = [
    {"errors"},
    {"ops", "io"},
    {"frontend"},
    {"analysis"},
    {"planning"},
    {"runtime", "memory"},
    {"hooks", "distributed"},
    {"module"},
    {"training"},
    {"cli"},
    {"__init__", "__main__"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
MAX_TOP_LEVEL_MODULES = 12


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its file. ``from pkg import
    sub`` counts as an import of ``pkg.sub`` when ``sub`` is a module, else of ``pkg``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:
                    targets.add(sub)
                elif base in modules:
                    targets.add(base)
    return targets - {name}


def _graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imports(name, path, modules))
    return graph


def _unit(module: str) -> str:
    """The layer entry a module belongs to: its subpackage, or its own name at the top."""
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_at_most_twelve_top_level_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_LEVEL_MODULES, top


def test_every_module_has_a_layer():
    missing = {_unit(m) for m in _modules()} - set(LEVEL)
    assert not missing, f"add {sorted(missing)} to LAYERS here and to docs/architecture.md"


def test_no_import_cycles():
    cycles = [sorted(c) for c in nx.strongly_connected_components(_graph()) if len(c) > 1]
    assert not cycles, cycles


def test_imports_go_down_the_layers():
    wrong = []
    for a, b in _graph().edges:
        ua, ub = _unit(a), _unit(b)
        if ua != ub and LEVEL[ub] >= LEVEL[ua]:
            wrong.append(f"{a} -> {b}")
    assert not wrong, wrong


@pytest.mark.parametrize(
    "source, expected",
    [
        ("from .errors import FxStreamError\n", {"fxstream.errors"}),
        ("def f():\n    from ..planning import plan\n", {"fxstream.planning.plan"}),
        ("from .. import memory\n", {"fxstream.memory"}),
    ],
)
def test_the_import_reader_sees_every_form(tmp_path, source, expected):
    """The checks above would pass vacuously if the reader missed lazy or package imports."""
    modules = _modules()
    name = "fxstream.runtime.example" if ".." in source else "fxstream.example"
    path = tmp_path / "example.py"
    path.write_text(source)
    assert _imports(name, path, modules) == expected


def test_a_cycle_is_found(tmp_path):
    graph = _graph()
    graph.add_edge("fxstream.errors", "fxstream.module")  # what a lazy import in errors would add
    assert any(len(c) > 1 for c in nx.strongly_connected_components(graph))


def test_a_module_saved_by_0_1_0_loads_and_computes_the_same():
    """tests/data/streamed_v0_1_0.pt: a StreamedModule (a small CNN with a Normalize input
    transform) saved by fxstream 0.1.0, when the package was flat, with its input and output."""
    import torch

    saved = torch.load(Path(__file__).parent / "data" / "streamed_v0_1_0.pt", weights_only=False)
    smodel = saved["module"]
    assert type(smodel).__module__ == "fxstream.module"
    out = smodel(saved["input"])
    assert torch.equal(out.detach(), saved["output"])
    out.sum().backward()  # the loaded module trains
    assert all(p.grad is not None for p in smodel.parameters())


def test_import_does_not_load_torchvision():
    """torchvision is optional: importing fxstream must not import it (its stochastic depth
    is recognised by name when a model brings it)."""
    code = "import sys, fxstream; sys.exit('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, timeout=120).returncode == 0
