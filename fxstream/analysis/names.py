"""Resolving ``boundary=`` names: a node name, or a module path (its last node)."""

from __future__ import annotations

import difflib

import torch.fx as fx

from ..errors import BoundaryError, module_path


def find_boundary(gm: fx.GraphModule, spec: str) -> fx.Node:
    """Resolve ``boundary=`` as a node name, or as a module path (its last node)."""
    nodes = list(gm.graph.nodes)
    for node in nodes:
        if node.name == spec:
            return node
    inside = [n for n in nodes if n.op != "output" and _in_module(module_path(n), spec)]
    if inside:
        return inside[-1]
    names = [n.name for n in nodes] + sorted({module_path(n) for n in nodes if module_path(n)})
    close = difflib.get_close_matches(spec, names, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise BoundaryError(
        f"boundary={spec!r} names no node or module of the traced model.{hint} "
        "Print fxstream.trace(model).graph for node names."
    )


def _in_module(path: str, spec: str) -> bool:
    return path == spec or path.startswith(spec + ".")
