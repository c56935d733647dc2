"""Stage 2, analyse: ``GraphModule`` -> :class:`Analysis` (the streamable trunk).

Walks the FX graph once in topological order and gives every node a state:

* ``spatial`` - a full-resolution tensor that depends locally on the image;
* ``global``  - depends on the whole image (after a reduction or a size query);
* ``const``   - depends on parameters and literals only;
* ``other``   - depends on another model input;
* ``shape``   - the full shape of a spatial tensor (indexing a batch/channel dim gives a const);
* ``size``    - computed from spatial sizes (``x.shape[2:]``, ``x.size(3) - y.size(3)``): the same
                in every tile, evaluated per input size by the planner. Only F.pad amounts,
                F.interpolate(size=...) and slicing may use it inside the trunk ("dynamic" ops),
                and views that only regroup channels (``x.view(n, g, c // g, h, w)``), which
                are rewritten to read their spatial sizes from the tile (``fxstream.runtime.channels``).

The trunk is the set of spatial nodes. With ``boundary=None`` it is every
spatial node, and the head starts where spatial tensors flow into reductions
(global pooling, flatten). A global value that flows back into a spatial op
(squeeze-excitation) is a non-local op inside the trunk and is rejected, as is
any op the op table rejects or does not know.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from ..errors import BoundaryError, UnsupportedOpError, describe, module_path
from ..frontend.functionalize import functionalize
from ..frontend.tracecheck import check_inplace_state, size_guard
from ..ops import channel_ops, statistics
from ..ops import table as ops
from . import diagnose
from .names import find_boundary

SPATIAL, GLOBAL, CONST, OTHER = "spatial", "global", "const", "other"
SHAPE = "shape"  # x.shape / x.size() of a spatial tensor: global, but indexable per dim
METADATA = ("ndim", "dtype", "device", "is_cuda", "layout", "requires_grad")
SIZE = "size"  # computed from spatial sizes; evaluated per input size (see plan.node_sizes)


@dataclass
class Analysis:
    """The trunk of a traced model. Node lists are in topological order."""

    gm: fx.GraphModule
    image: fx.Node  # the image placeholder
    trunk: list  # spatial fx.Nodes computed per tile (image excluded)
    constants: list  # const fx.Nodes the trunk needs
    outputs: tuple  # the trunk outputs the rest of the model reads, in topological order
    verdicts: dict  # fx.Node -> ops.Local | ops.Window
    layouts: dict  # fx.Node -> ops.Layout
    ndim: int
    dynamic: frozenset = frozenset()  # trunk nodes whose window depends on spatial sizes
    size_nodes: list = None  # shape/size fx.Nodes the dynamic nodes and size guards need, in graph order

    @property
    def output(self) -> fx.Node:
        """The primary trunk output (the last in topological order): the tiles are its blocks."""
        return self.outputs[-1]


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for inp in node.all_input_nodes:
            dag.add_edge(inp, node)
    return dag


def analyze(
    gm: fx.GraphModule, boundary: str | tuple[str, ...] | None = None, ndim_hint: int | None = None
) -> Analysis:
    """Find the trunk. ``boundary``: the last streamed op, or several (one per trunk output);
    the trunk is what they need. ``ndim_hint`` (from a per-dim tile_size) is used only when no
    convolution or pooling op tells the number of spatial dims."""
    graph = gm.graph
    dag = to_networkx(graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise BoundaryError("the model's forward() takes no input to stream")
    image = placeholders[0]
    functionalize(gm, image, dag)
    channel_ops.fuse_pieces(gm)
    dag = to_networkx(graph)
    ndim = infer_ndim(gm, image, dag) or ndim_hint or 2
    scope = None
    if isinstance(boundary, str):
        boundary = (boundary,)
    if boundary is not None:
        ends = {spec: find_boundary(gm, spec) for spec in boundary}
        scope = set().union(*(nx.ancestors(dag, end) | {end} for end in ends.values()))
    _record_constant_shapes(gm, dag)
    states: dict = {}
    verdicts: dict = {}
    try:
        layouts, dynamic = _walk(gm, image, ndim, scope, states, verdicts)
    except UnsupportedOpError as err:
        if boundary is not None:
            raise
        raise _with_prefix(err, gm, states, verdicts, image) from None
    dag = to_networkx(graph)  # channel-only views were rewritten without their size arguments
    trunk_nodes = {n for n, s in states.items() if s == SPATIAL and n is not image}
    if boundary is not None:
        trunk_nodes &= scope
        for spec, end in ends.items():
            if end not in trunk_nodes:
                raise BoundaryError(
                    f"boundary={spec!r} resolves to node '{end.name}', which is not a full-resolution "
                    "tensor computed from the image; name a convolution, activation or block output"
                )
    outputs = _trunk_outputs(trunk_nodes, states, dag, graph)
    check_inplace_state(gm, outputs[-1])
    needed = set(outputs).union(*(nx.ancestors(dag, o) for o in outputs))
    trunk = [n for n in graph.nodes if n in trunk_nodes and n in needed]
    constants = [n for n in graph.nodes if states.get(n) in (CONST, SHAPE) and n in needed and n.op != "output"]
    dynamic = frozenset(n for n in trunk if n in dynamic)
    guards = [n for n in graph.nodes if n.op == "call_function" and n.target is size_guard and states.get(n) == SIZE]
    size_needed = set(guards).union(*(nx.ancestors(dag, n) for n in list(dynamic) + guards))
    size_nodes = [n for n in graph.nodes if n in size_needed and states.get(n) in (SIZE, SHAPE)]
    return Analysis(gm, image, trunk, constants, outputs, verdicts, layouts, ndim, dynamic, size_nodes)


def infer_ndim(gm: fx.GraphModule, image: fx.Node, dag: nx.DiGraph) -> int | None:
    """Spatial dims, from the first convolution or pooling op that reads the image."""
    for node in nx.topological_sort(dag.subgraph(nx.descendants(dag, image))):
        name = ""
        if node.op == "call_module":
            name = type(gm.get_submodule(node.target)).__name__.lower()
        elif node.op == "call_function":
            name = getattr(node.target, "__name__", "")
        for dims in (1, 2, 3):
            if name.endswith(f"{dims}d") or name.endswith(f"{dims}d_with_indices"):
                return dims
    return None


def _record_constant_shapes(gm: fx.GraphModule, dag: nx.DiGraph) -> None:
    """Evaluate parameter-only nodes once, so ops can read weight shapes."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dependent = set(placeholders)
    for p in placeholders:
        dependent |= nx.descendants(dag, p)
    interp = fx.Interpreter(gm)
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node in dependent or node.op == "output":
                continue
            try:
                value = interp.run_node(node)
            except Exception:  # a constant we cannot evaluate leaves its shape unknown
                continue
            interp.env[node] = value
            if isinstance(value, torch.Tensor):
                node.meta["tensor_shape"] = tuple(value.shape)


def _walk(gm, image, ndim, scope, states: dict, verdicts: dict):
    """Give every node a state; fills ``states`` and ``verdicts`` (read on errors) and returns
    the layouts and the dynamic nodes."""
    layouts: dict = {image: (None, None) + tuple(range(ndim))}
    dynamic: set = set()
    roots: dict = {image: image}  # spatial node -> a node of the same spatial size
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "placeholder":
            states[node] = SPATIAL if node is image else OTHER
            continue
        if node.op == "get_attr":
            states[node] = CONST
            continue
        inputs = node.all_input_nodes
        input_states = {states.get(n, CONST) for n in inputs}
        size_state = _size_query(node, layouts)
        if size_state is not None:
            states[node] = size_state
            continue
        if scope is not None and node not in scope:
            states[node] = GLOBAL if SPATIAL in input_states else _merge_non_spatial(input_states)
            continue
        if SPATIAL not in input_states:
            states[node] = _merge_non_spatial(input_states)
            continue
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        ctx = ops.OpContext(node, module, layouts, ndim)
        if SIZE in input_states and ops.pools_whole_map(ctx):
            states[node] = GLOBAL  # a reduction: the head starts here
            continue
        if SIZE in input_states and _regroup_channels(node, layouts, roots, states):
            input_states = {states.get(n, CONST) for n in node.all_input_nodes}
        if SIZE in input_states or ops.needs_sizes(ctx):
            if channel_ops.is_view(node):
                raise _unsupported(
                    node,
                    module,
                    "it reshapes spatial dims (only views that regroup the channels and keep every spatial "
                    "dim, as read with x.size(d) or x.shape[d], are local)",
                    "keep the spatial dims unchanged in the view, or pass boundary=... to stream only the part "
                    "before it",
                )
            if not ops.accepts_sizes(ctx):
                raise _unsupported(
                    node,
                    module,
                    "it uses the spatial size of a tensor inside the trunk; fxstream evaluates sizes per input "
                    "only for F.pad amounts, F.interpolate(size=...) and slicing",
                    "compute this from constants, or pass boundary=... to stream only the part before it",
                )
            dynamic.add(node)
            ctx.pending = True
        try:
            verdict = ops.classify(ctx)
        except Exception as exc:  # malformed arguments: report as unsupported, naming the node
            verdict = ops.Rejected(f"fxstream could not read its arguments ({exc})", ops.BOUNDARY_FIX)
        if isinstance(verdict, statistics.Decompose):  # until the analysis streams statistics (issue 20)
            verdict = ops.Rejected(
                f"{verdict.norm.op} normalises with statistics over the whole image", ops.BOUNDARY_FIX
            )
        if isinstance(verdict, (ops.Reduction, statistics.Statistic)):
            states[node] = GLOBAL
            continue
        if isinstance(verdict, ops.Rejected):
            category = diagnose.rejected_category(verdict.reason, module, node)
            reason = f"{category}: {verdict.reason}" if category else verdict.reason
            raise _unsupported(node, module, reason, verdict.fix)
        _check_inputs(gm, node, module, states)
        states[node] = SPATIAL
        verdicts[node] = verdict
        layouts[node] = verdict.layout if isinstance(verdict, ops.Local) else layouts[verdict.input]
        local = isinstance(verdict, ops.Local)
        roots[node] = roots.get(ctx.spatial_inputs()[0], node) if local else node
    return layouts, dynamic


def _with_prefix(err: UnsupportedOpError, gm, states: dict, verdicts: dict, image) -> UnsupportedOpError:
    """``err`` with the largest streamable prefix named as the ``boundary=`` to use."""
    prefix = diagnose.largest_prefix(gm, states, verdicts, image)
    if prefix is None:
        return err
    spec, described = prefix
    message = f"{err}\n  largest streamable prefix: {described}"
    return UnsupportedOpError(message, node=err.node, module_path=err.module_path, op=err.op, boundary=spec)


def _regroup_channels(node: fx.Node, layouts: dict, roots: dict, states: dict) -> bool:
    """Rewrite a channel-only view into ``channel_ops.regroup`` (see ``fxstream.ops.channel_ops``)."""
    found = channel_ops.channel_view(node, layouts, roots, lambda a: isinstance(a, fx.Node) and states.get(a) == SIZE)
    if found is None:
        return False
    x, shape, dims = found
    node.op, node.target, node.args, node.kwargs = "call_function", channel_ops.regroup, (x, shape, dims), {}
    return True


def _merge_non_spatial(input_states: set) -> str:
    if GLOBAL in input_states or SHAPE in input_states:
        return GLOBAL
    if OTHER in input_states:
        return OTHER
    if SIZE in input_states:
        return SIZE
    return CONST


def _size_query(node: fx.Node, layouts: dict) -> str | None:
    """``x.size(d)``/``x.shape[d]``/``x.dim()`` of a spatial tensor: const for batch and
    channel dims (same in every tile), global for spatial dims."""
    target = node.target
    source = node.args[0] if node.args else None
    if node.op == "call_function" and target is operator.getitem and _is_shape(source):
        base = source.args[0]
        return _dim_state(layouts[base], node.args[1]) if base in layouts else None
    if source not in layouts:
        return None
    if node.op == "call_method" and target == "dim":
        return CONST
    if node.op == "call_function" and target is getattr and node.args[1] in METADATA:
        return CONST  # x.ndim, x.dtype, x.device...: the same in every tile
    if node.op == "call_method" and target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return SHAPE if dim is None else _dim_state(layouts[source], dim)
    if node.op == "call_function" and target is getattr and node.args[1] == "shape":
        return SHAPE  # getitem on it is resolved above
    return None


def _is_shape(node: fx.Node | object) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and len(node.args) == 1:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _dim_state(layout: ops.Layout, dim) -> str:
    if isinstance(dim, int) and layout[dim % len(layout)] is None:
        return CONST
    return SIZE if isinstance(dim, (int, slice)) else GLOBAL


def _check_inputs(gm: fx.GraphModule, node: fx.Node, module, states: dict) -> None:
    for inp in node.all_input_nodes:
        if states.get(inp) == GLOBAL:
            source = _global_source(inp, states)
            category = diagnose.global_category(gm, node, source, states)
            raise _unsupported(
                node,
                module,
                f"{category}: it combines the image with '{source.name}' (module '{module_path(source) or '<top>'}'), "
                f"which depends on the whole image ({category} inside the trunk)",
                "pass boundary=<a node before the reduction> to stream only the part before it, "
                "or remove the global block",
            )
        if states.get(inp) == OTHER:
            raise _unsupported(
                node,
                module,
                f"it uses '{inp.name}', a model input other than the image",
                "stream a model whose trunk depends on the image alone, or pass boundary=... "
                "to stop streaming before this op",
            )


def _global_source(node: fx.Node, states: dict) -> fx.Node:
    """Walk up from a global value to the reduction that made it."""
    while True:
        spatial = [n for n in node.all_input_nodes if states.get(n) == SPATIAL]
        if spatial:
            return node
        parents = [n for n in node.all_input_nodes if states.get(n) in (GLOBAL, SHAPE)]
        if not parents:
            return node
        node = parents[0]


def _unsupported(node: fx.Node, module, reason: str, fix: str) -> UnsupportedOpError:
    op = type(module).__name__ if module is not None else str(getattr(node.target, "__name__", node.target))
    message = f"cannot stream {op}: {reason}.\n  {describe(node)}\n  fix: {fix}"
    return UnsupportedOpError(message, node=node.name, module_path=module_path(node), op=op)


def _trunk_outputs(trunk: set, states: dict, dag: nx.DiGraph, graph: fx.Graph) -> tuple:
    """The trunk nodes the rest of the model reads, in topological order: each is streamed
    and assembled whole. Size queries do not count as uses: those of batch/channel dims
    (const) are evaluated per tile, those of spatial dims per input size."""
    metadata = (CONST, SHAPE, SIZE)
    used = {n for n in trunk if any(u not in trunk and states.get(u) not in metadata for u in dag.successors(n))}
    if not used:
        raise BoundaryError("nothing to stream: no full-resolution op reads the image before the first global op")
    return tuple(n for n in graph.nodes if n in used)


def head_nodes(analysis: Analysis) -> set:
    """The nodes the graph output needs, given the trunk outputs as computed values."""
    trunk = set(analysis.trunk)
    outputs = set(analysis.outputs)
    needed: set = set()
    stack = [n for n in analysis.gm.graph.nodes if n.op in ("output", "placeholder")]
    while stack:
        node = stack.pop()
        if node in needed or node in outputs:
            continue
        if node in trunk:  # cannot happen: analyze makes every trunk node the head reads an output
            raise BoundaryError(f"planner: the rest of the model reads '{node.name}', which is not a trunk output")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed
