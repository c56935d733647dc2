"""Stage 1b, functionalize: rewrite in-place ops on image-dependent tensors out of place.

In a tile, an op reads a *window* of its producer, often a view. An in-place op would
write through that view into the producer's tile tensor, and only over the window's
region, so other consumers of the producer would read a partly modified tensor. The
eager semantics are recovered without aliasing: ``y = relu_(a)`` becomes
``y = relu(a)``, and every reader of ``a`` after it reads ``y`` instead.

    a = conv1(x); relu_(a); conv2(a)   ->   a = conv1(x); y = relu(a); conv2(y)

In-place ops whose mutated tensor has a view alias created earlier (``v = a.permute(...);
a.relu_(); v + 1``) cannot be rewritten this way and are rejected.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import UnsupportedOpError, user_error
from ..ops.table import INPLACE_MODULES, VIEW_FUNCTIONS, VIEW_METHODS

_OPERATORS = {
    operator.iadd: operator.add,
    operator.isub: operator.sub,
    operator.imul: operator.mul,
    operator.itruediv: operator.truediv,
}


def functionalize(gm: fx.GraphModule, image: fx.Node, dag: nx.DiGraph) -> None:
    """Rewrite ``gm.graph`` in place (see the module docstring)."""
    dependent = nx.descendants(dag, image)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node not in dependent or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        form = out_of_place(gm, node)
        if form is None:
            continue
        mutated = node.args[0]
        later = [u for u in mutated.users if u is not node and order[u] > order[node]]
        _check_no_alias(node, mutated, order)
        # Rewrite the node itself, so its name (usable as boundary=) and metadata stay.
        node.op, node.target, node.args, node.kwargs = form
        for user in later:
            user.replace_input_with(mutated, node)
    gm.recompile()


def out_of_place(gm: fx.GraphModule, node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """The out-of-place form of an in-place node, or None if it is not in place."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if getattr(module, "inplace", False) is not True:
            return None
        if type(module) not in INPLACE_MODULES:
            raise user_error(
                UnsupportedOpError,
                f"cannot stream {type(module).__name__}(inplace=True): fxstream has no out-of-place form of it, "
                "and an in-place op would write through a tile's view of its input.",
                node=node,
                op=type(module).__name__,
                fix="construct it with inplace=False",
            )
        function, attributes = INPLACE_MODULES[type(module)]
        return "call_function", function, node.args, {a: getattr(module, a) for a in attributes}
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
            return "call_method", name[:-1], node.args, dict(node.kwargs)
        return None
    if node.op != "call_function":
        return None
    if node.target in _OPERATORS:
        return "call_function", _OPERATORS[node.target], node.args, dict(node.kwargs)
    name = getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        for namespace in (torch, F):
            if getattr(namespace, name, None) is node.target and hasattr(namespace, name[:-1]):
                return "call_function", getattr(namespace, name[:-1]), node.args, dict(node.kwargs)
    return _without_inplace_flag(node)


def _without_inplace_flag(node: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    if node.kwargs.get("inplace") is True:
        return "call_function", node.target, node.args, {**node.kwargs, "inplace": False}
    try:  # positional flag, e.g. F.relu(x, True)
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return None
    if bound.arguments.get("inplace") is not True:
        return None
    bound.arguments["inplace"] = False
    return "call_function", node.target, tuple(bound.args), dict(bound.kwargs)


def _check_no_alias(node: fx.Node, mutated: fx.Node, order: dict) -> None:
    """Reject when a view of ``mutated`` made before ``node`` is read after it."""
    views, frontier = [], [mutated]
    while frontier:
        for user in frontier.pop().users:
            if order[user] < order[node] and _is_view(user):
                views.append(user)
                frontier.append(user)
    for view in views:
        if any(order[u] > order[node] for u in view.users):
            op = str(getattr(node.target, "__name__", node.target))
            raise user_error(
                UnsupportedOpError,
                f"cannot stream {op}: it modifies '{mutated.name}' in place while '{view.name}', a view of it, "
                "is read afterwards.",
                node=node,
                op=str(node.target),
                fix="use the out-of-place form (inplace=False, x = x + y instead of x += y)",
            )


def _is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in VIEW_METHODS
    return node.op == "call_function" and node.target in VIEW_FUNCTIONS
