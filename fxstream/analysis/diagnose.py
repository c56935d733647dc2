"""What to tell the user when the trunk cannot stream: the kind of non-local op, and the
largest prefix that does stream.

* :func:`global_category` names what a whole-image value flowing back into the trunk is:
  ``attention`` (products of pixel features, softmax over pixels), ``global pooling branch``
  (a pooled map expanded back to the image, as in ASPP), ``global norm`` (statistics over
  pixels: GroupNorm-like code, ConvNeXt-V2's GRN), ``squeeze-excitation`` (a pooled, gated
  channel vector), or ``global reduction``.
* :func:`prefixes` finds the trunk nodes that end the largest prefixes of the model's code
  that stream, as ``boundary=`` candidates; :func:`describe_prefix` words the suggestion
  (its cumulative stride, and the further trunk outputs the compiled prefix has).
"""

from __future__ import annotations

from fractions import Fraction

import networkx as nx
import torch.fx as fx
import torch.nn as nn

from ..errors import module_path
from ..ops import geometry as g
from ..ops import table as ops
from .names import find_boundary

ATTENTION = "attention"
POOLING_BRANCH = "global pooling branch"
GLOBAL_NORM = "global norm"
SQUEEZE_EXCITATION = "squeeze-excitation"
GLOBAL_REDUCTION = "global reduction"

_ATTENTION_OPS = {"matmul", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention", "softmax", "MultiheadAttention"}
_EXPAND_OPS = {"interpolate", "upsample", "Upsample", "expand", "expand_as", "repeat", "UpsamplingBilinear2d"}
_NORM_REDUCTIONS = {"norm", "vector_norm", "var", "std", "var_mean", "std_mean", "group_norm", "instance_norm"}
_GATES = {"sigmoid", "Sigmoid", "hardsigmoid", "Hardsigmoid", "softmax", "tanh", "Tanh"}


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return type(gm.get_submodule(str(node.target))).__name__
    return str(getattr(node.target, "__name__", node.target))


def global_category(gm: fx.GraphModule, consumer: fx.Node, source: fx.Node, states: dict) -> str:
    """The kind of block that computed ``source`` (a whole-image value read by ``consumer``)."""
    path = _global_path(consumer, states)
    names = {op_name(gm, n) for n in path}
    reductions = {op_name(gm, n) for n in path if any(states.get(i) == "spatial" for i in n.all_input_nodes)}
    if names & _ATTENTION_OPS - {"softmax"} or "softmax" in names and not names & {"mean", "adaptive_avg_pool2d"}:
        return ATTENTION
    if names & _EXPAND_OPS:
        return POOLING_BRANCH
    if reductions & _NORM_REDUCTIONS or {"rsqrt", "sqrt"} & names:
        return GLOBAL_NORM
    if names & _GATES:
        return SQUEEZE_EXCITATION
    return GLOBAL_REDUCTION


def _global_path(consumer: fx.Node, states: dict) -> set:
    """The non-spatial nodes between the trunk and ``consumer``: its global inputs and theirs."""
    seen, stack = set(), [n for n in consumer.all_input_nodes if states.get(n) in ("global", "shape")]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(n for n in node.all_input_nodes if states.get(n) in ("global", "shape", "const"))
    return seen


def rejected_category(reason: str, module: nn.Module | None, node: fx.Node) -> str | None:
    """The category of an op the table rejects outright, or None."""
    text = reason.lower()
    if isinstance(module, nn.MultiheadAttention) or "attention" in text:
        return ATTENTION
    if "normalis" in text or "layernorm" in text or "layer_norm" in text:
        return GLOBAL_NORM
    return None


def prefixes(gm: fx.GraphModule, states: dict, verdicts: dict, image: fx.Node, rejected: fx.Node, count: int = 3):
    """The ``count`` largest streamable prefixes (most trunk nodes) among the trunk nodes
    classified before the ``rejected`` node, largest first, as ``(boundary, node)``.

    A prefix ends at one node and holds its trunk ancestors. Its other nodes may be read
    outside it: they become further trunk outputs, e.g. the stride-4 skip that a DeepLabV3+
    decoder reads besides the encoder output. Two kinds of readers disqualify a prefix: one
    that runs before its end in the model's code (a sibling branch the end cuts off), and,
    when the end feeds the rejected op, another op that feeds it too (the end would be one
    branch of the block being rejected, such as one of ASPP's convolutions). Readers after
    the end that the rejected op does not need are fine: an FPN's top-down path streams
    although the level blocks that read it hold GroupNorm."""
    dag = nx.DiGraph()
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            dag.add_edge(inp, node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    feeds_rejected = nx.ancestors(dag, rejected) if rejected in dag else set()
    spatial = [n for n in gm.graph.nodes if n in verdicts]
    spatial_set = set(spatial)
    metadata = ("const", "shape", "size")
    found: list = []  # (size, node), largest first
    for index in reversed(range(len(spatial))):
        if len(found) == count and index + 1 <= found[-1][0]:  # no earlier node can have a larger prefix
            break
        end = spatial[index]
        inside = (nx.ancestors(dag, end) & spatial_set) | {end}
        if len(found) == count and len(inside) <= found[-1][0]:
            continue
        branch = end in feeds_rejected
        leaks = any(
            u not in inside
            and states.get(u, "const") not in metadata
            and (order[u] < order[end] or branch and u in feeds_rejected)
            for n in inside - {end}
            for u in dag.successors(n)
        )
        if not leaks and _strides(end, verdicts, image) is not None:
            found = sorted(found + [(len(inside), end)], key=lambda f: -f[0])[:count]
    return [(_boundary_name(gm, node), node) for _, node in found]


def describe_prefix(spec: str, node: fx.Node, others: list[str], verdicts: dict, image: fx.Node) -> str:
    """``boundary='spec' (node 'n', stride S); it also streams 'a', which the rest reads``."""
    described = f"boundary={spec!r} (node '{node.name}', stride {_fmt(_strides(node, verdicts, image))})"
    if others:
        described += f"; it also streams {', '.join(repr(name) for name in others)}, which the rest reads"
    return described


def _boundary_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """The shortest module path whose last node is ``node``, else the node name."""
    path = module_path(node)
    parts = path.split(".") if path else []
    for i in range(1, len(parts) + 1):
        spec = ".".join(parts[:i])
        if find_boundary(gm, spec) is node:
            return spec
    return node.name


def _strides(node: fx.Node, verdicts: dict, image: fx.Node) -> tuple | None:
    """Cumulative stride of ``node`` per spatial axis (Fractions), following first inputs."""
    chain = []
    stride = None
    while node is not image:
        verdict = verdicts.get(node)
        if verdict is None:
            return None
        if isinstance(verdict, ops.Window) and verdict.kind == "resample" and verdict.stencils is None:
            # interpolate(size=other.shape[2:]) before sizes are resolved: it has other's stride
            like = _size_source(node, verdicts, image)
            if like is not None:
                stride = _strides(like, verdicts, image)
                break
        chain.append(verdict)
        source = verdict.input if isinstance(verdict, ops.Window) else _first_spatial(node, verdicts, image)
        if source is None:
            return None
        node = source
    for verdict in reversed(chain):
        if isinstance(verdict, ops.Window) and verdict.stencils is not None:
            factors = tuple(_factor(s) for s in verdict.stencils)
            stride = factors if stride is None else tuple(a * b for a, b in zip(stride, factors))
    return stride or (Fraction(1),)


def _size_source(node: fx.Node, verdicts: dict, image: fx.Node) -> fx.Node | None:
    """The trunk tensor whose sizes an ``interpolate(size=...)`` node's size comes from
    (``size=skip.shape[2:]``), or None."""
    size = node.kwargs.get("size", node.args[1] if len(node.args) > 1 else None)
    todo = _nodes_in(size)
    seen = set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n is image or (n in verdicts and n is not node):
            return n
        todo.extend(n.all_input_nodes)
    return None


def _nodes_in(value) -> list:
    found = []
    fx.node.map_arg(value, found.append)
    return found


def _first_spatial(node: fx.Node, verdicts: dict, image: fx.Node) -> fx.Node | None:
    return next((n for n in node.all_input_nodes if n in verdicts or n is image), None)


def _factor(op) -> Fraction:
    if isinstance(op, g.Stencil):
        return Fraction(op.stride)
    if isinstance(op, g.Transposed):
        return Fraction(1, op.stride)
    if isinstance(op, g.Shuffle):
        return Fraction(1, op.factor)
    if isinstance(op, g.Resample) and op.scale:
        return 1 / Fraction(op.scale).limit_denominator(1000)
    return Fraction(1)


def _fmt(stride: tuple) -> str:
    values = {str(s) for s in stride}
    return values.pop() if len(values) == 1 else "x".join(str(s) for s in stride)
