"""Levels of global statistics in a trunk: the streamed passes each node runs in, and their
cost (issue 20; ``docs/design-statistics.md``).

A statistic's *level* is 1 + the *depth* of its input; a trunk node's depth is the highest
level it depends on. Pass ``j`` (1 <= j <= L) computes ``A_j``, the trunk ancestors of the
level-``j`` statistics' inputs, with the values of lower levels as constants; the output pass
computes every trunk node. A node in ``u`` of the ``A_j`` runs in ``1 + u`` forward passes and
``1 + u`` backward passes, so with ``F_v`` its forward work (carry, no halo):

    ratio = 4 sum_v F_v (1 + u_v) / (3 sum_v F_v)      ~= (4/3) (1 + u_mean)

``compile`` refuses more than ``max_levels`` levels with :func:`refusal`, which estimates
``F_v`` statically (convolution and linear MACs from the weight shapes, times the pixels of
the node's cumulative stride); ``fxstream plan`` uses measured FLOPs instead.
"""

from __future__ import annotations

import math
from collections import Counter
from fractions import Fraction

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from ..errors import StatisticsError, module_path
from ..ops import table as ops
from . import diagnose

PLAIN_RATIO = 4 / 3  # a streamed step without statistics (carry): forward, recomputation, backward


def pass_nodes(trunk: list, statistics: tuple, dag: nx.DiGraph) -> dict[int, frozenset]:
    """Level ``j`` -> ``A_j``: the trunk nodes (inclusive ancestors of the level-``j``
    statistics' inputs) that pass ``j`` computes."""
    members = set(trunk)
    found: dict[int, set] = {}
    for stat in statistics:
        nodes = found.setdefault(stat.level, set())
        nodes |= (nx.ancestors(dag, stat.input) | {stat.input}) & members
    return {level: frozenset(found[level]) for level in sorted(found)}


def uses(trunk: list, passes: dict) -> dict:
    """Trunk node -> ``u``: the number of statistics passes that compute it."""
    return {n: sum(n in nodes for nodes in passes.values()) for n in trunk}


def predicted_ratio(weights: dict, u: dict, streamed: set | None = None) -> float:
    """Predicted training step over a plain step (carry): streamed nodes cost ``4 (1 + u)``,
    the others (the rest after a boundary) ``3``. Equal weights when none is known."""
    total = sum(weights.values())
    if total <= 0:
        weights, total = dict.fromkeys(u, 1.0), float(len(u) or 1)
    streamed = set(u) if streamed is None else streamed
    work = sum(w * (4 * (1 + u.get(n, 0)) if n in streamed else 3) for n, w in weights.items())
    return work / (3 * total)


def static_weights(gm: fx.GraphModule, trunk: list, verdicts: dict, image: fx.Node) -> dict:
    """Trunk node -> forward MACs per image pixel, from weight shapes and cumulative strides
    (convolutions and linear layers; other ops count 0). No probe run."""
    weights = {}
    for node in trunk:
        macs = _macs(gm, node, verdicts.get(node))
        stride = diagnose._strides(node, verdicts, image) or (Fraction(1),)
        weights[node] = macs / float(math.prod(stride)) if macs else 0.0
    return weights


def _macs(gm: fx.GraphModule, node: fx.Node, verdict) -> float:
    weight = None
    if isinstance(verdict, ops.Window) and verdict.kind in ("conv", "conv_transpose"):
        weight = verdict.params.get("weight")
    elif node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
        weight = f"{node.target}.weight"
    if isinstance(weight, str):
        try:
            return float(gm.get_parameter(weight).numel())
        except AttributeError:
            return 0.0
    if isinstance(weight, fx.Node) and "tensor_shape" in weight.meta:
        return float(math.prod(weight.meta["tensor_shape"]))
    return 0.0


def describe_statistics(statistics: tuple) -> str:
    """'global norm: InstanceNorm2d x18; squeeze-excitation: mean x2'."""
    by_category: dict = {}
    for stat in statistics:
        by_category.setdefault(stat.category, Counter())[stat.op] += 1
    return "; ".join(
        f"{category}: " + ", ".join(f"{op} x{n}" if n > 1 else op for op, n in ops.items())
        for category, ops in by_category.items()
    )


def refusal(analysis, max_levels: int, dag: nx.DiGraph, prefix: tuple | None = None) -> StatisticsError:
    """The error of a trunk with more than ``max_levels`` levels: the count, the first and last
    statistic, the predicted ratio, and the fixes (raise ``max_levels``, or ``prefix``: the
    largest prefix before the first node beyond ``max_levels``, as ``(boundary, node,
    description)``, from the analysis)."""
    stats = analysis.statistics
    levels = analysis.levels
    passes = pass_nodes(analysis.trunk, stats, dag)
    u = uses(analysis.trunk, passes)
    weights = static_weights(analysis.gm, analysis.trunk, analysis.verdicts, analysis.image)
    ratio = predicted_ratio(weights, u)
    first = min(stats, key=lambda s: s.level)
    last = max(stats, key=lambda s: s.level)
    name = type(analysis.gm).__name__
    fixes = [f"pass max_levels={levels} to accept that cost"]
    boundary, where = None, ""
    if prefix is not None:
        boundary, node, described = prefix
        share, prefix_ratio = _prefix_cost(analysis, node, weights, dag)
        where = f"\n  largest streamable prefix: {described}"
        fixes.append(
            f"boundary={boundary!r} to stream only the part with at most {max_levels} "
            f"level{'s' if max_levels != 1 else ''} ({share:.0%} of the "
            f"work, predicted {prefix_ratio:.2f}x; the rest runs plain, with its memory)"
        )
    if any(s.category == diagnose.GLOBAL_NORM and s.op.startswith("BatchNorm") for s in stats):
        fixes.append("call model.eval() (BatchNorm with running statistics is local)")
    message = (
        f"cannot stream {name} whole with max_levels={max_levels}: its trunk holds {levels} dependent levels of "
        f"global statistics ({describe_statistics(stats)}: from {_named(first)} at level {first.level} to "
        f"{_named(last)} at level {last.level}). Each level adds a streamed pass forward and one backward: "
        f"{2 * (levels + 1)} passes, a predicted training step of {ratio:.1f}x a plain step's work (a trunk "
        f"without statistics: {PLAIN_RATIO:.2f}x).\n  fix: " + ", or ".join(fixes) + where
    )
    return StatisticsError(
        message,
        node=last.node.name,
        module_path=module_path(last.node),
        op=last.op,
        boundary=boundary,
        levels=levels,
        max_levels=max_levels,
        predicted_step_ratio=ratio,
    )


def _named(stat) -> str:
    path = module_path(stat.node)
    return f"'{path}'" if path else f"node '{stat.node.name}'"


def _prefix_cost(analysis, node, weights: dict, dag: nx.DiGraph) -> tuple[float, float]:
    """(share of the trunk's work, predicted step ratio) of ``boundary=node``: its trunk
    ancestors streamed, the rest plain."""
    trunk = set(analysis.trunk)
    inside = (nx.ancestors(dag, node) & trunk) | {node}
    total = sum(weights.values()) or 1.0
    stats = tuple(
        s for s in analysis.statistics if s.input in inside and all(o in inside for o in _readers(s, dag, trunk))
    )
    members = [n for n in analysis.trunk if n in inside]
    u = uses(members, pass_nodes(members, stats, dag))
    return sum(weights[n] for n in inside) / total, predicted_ratio(weights, u, inside)


def _readers(stat, dag: nx.DiGraph, trunk: set) -> set:
    """The trunk nodes that read ``stat`` back (through non-trunk nodes)."""
    found, stack, seen = set(), [stat.node], set()
    while stack:
        for user in dag.successors(stack.pop()):
            if user in trunk:
                found.add(user)
            elif user not in seen:
                seen.add(user)
                stack.append(user)
    return found
