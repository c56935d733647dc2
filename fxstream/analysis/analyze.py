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

import copy
import operator
from dataclasses import dataclass

import networkx as nx
import torch
import torch.fx as fx

from ..errors import BoundaryError, FxStreamError, UnsupportedOpError, describe, module_path, user_error
from ..frontend.functionalize import functionalize
from ..frontend.tracecheck import check_inplace_state, size_guard
from ..ops import channel_ops
from ..ops import table as ops
from . import diagnose
from .names import find_boundary

SPATIAL, GLOBAL, CONST, OTHER = "spatial", "global", "const", "other"
SHAPE = "shape"  # x.shape / x.size() of a spatial tensor: global, but indexable per dim
METADATA = ("ndim", "dtype", "device", "is_cuda", "layout", "requires_grad")
# x.new_empty(shape) and the like read only x's dtype and device: timm's DropPath draws its
# per-sample mask with x.new_empty((N, 1, 1, 1)).bernoulli_(keep)
NEW_TENSOR_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full")
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
    head_guards: tuple = ()  # size guards the head checks on every call (the planner cannot evaluate them)

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
    channel_ops.fuse_space_to_depth(gm)
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
    unknown: list = []  # the first unknown op: (its error, states and verdicts before it)
    try:
        layouts, dynamic = _walk(gm, image, ndim, scope, states, verdicts, unknown)
        later = None
    except UnsupportedOpError as err:
        if not unknown:
            if boundary is not None:
                raise
            raise _with_prefix(err, gm, states, verdicts, image, ndim) from None
        later = err
    if unknown:  # looked past it: name a non-local op further on too
        err, states, verdicts = unknown[0]
        err = _with_later(err, later)
        if boundary is not None:
            raise err
        raise _with_prefix(err, gm, states, verdicts, image, ndim) from None
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
    guards, head_guards = _place_guards(graph, states, layouts, set(outputs) | {image})
    size_needed = set(guards).union(*(nx.ancestors(dag, n) for n in list(dynamic) + guards))
    size_nodes = [n for n in graph.nodes if n in size_needed and states.get(n) in (SIZE, SHAPE)]
    return Analysis(gm, image, trunk, constants, outputs, verdicts, layouts, ndim, dynamic, size_nodes, head_guards)


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


def _walk(gm, image, ndim, scope, states: dict, verdicts: dict, unknown: list):
    """Give every node a state; fills ``states`` and ``verdicts`` (read on errors) and returns
    the layouts and the dynamic nodes. At the first op the table does not know, it records
    the error in ``unknown`` (with the states and verdicts so far) and goes on as if the op
    were local and pointwise, so that a non-local op further on can be named too."""
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
        if node.op == "call_method" and node.target in NEW_TENSOR_METHODS and node.args[0] in layouts:
            others = {states.get(n, CONST) for n in inputs if n is not node.args[0]}
            if not others & {SPATIAL, SIZE}:  # a tensor of a shape that no pixel or spatial size sets
                states[node] = _merge_non_spatial(others)
                continue
        if SIZE in input_states and _sized_like(node, layouts, roots, states):
            input_states = {states.get(n, CONST) for n in node.all_input_nodes}
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
        if isinstance(verdict, ops.Reduction):
            states[node] = GLOBAL
            continue
        if isinstance(verdict, ops.Unknown) and not unknown and isinstance(ops.pointwise(ctx), ops.Local):
            unknown.append((_unsupported(node, module, verdict.reason, verdict.fix), dict(states), dict(verdicts)))
            verdict = ops.pointwise(ctx)
        elif isinstance(verdict, ops.Rejected):
            category = diagnose.rejected_category(verdict.reason, module, node)
            reason = f"{category}: {verdict.reason}" if category else verdict.reason
            raise _unsupported(node, module, reason, verdict.fix)
        _check_inputs(gm, node, module, states)
        states[node] = SPATIAL
        verdicts[node] = verdict
        layouts[node] = verdict.layout if verdict.layout is not None else layouts[verdict.input]
        local = isinstance(verdict, ops.Local)
        roots[node] = roots.get(ctx.spatial_inputs()[0], node) if local else node
    return layouts, dynamic


def _with_later(err: UnsupportedOpError, later: UnsupportedOpError | None) -> UnsupportedOpError:
    """``err`` (an unknown op) with the first line of ``later``, a rejection further on."""
    if later is None:
        return err
    where = f"node '{later.node}'" + (f" in module '{later.module_path}'" if later.module_path else "")
    message = f"{err}\n  further on, if that op is local: {str(later).splitlines()[0]} ({where})"
    return UnsupportedOpError(message, node=err.node, module_path=err.module_path, op=err.op)


def _with_prefix(err: UnsupportedOpError, gm, states: dict, verdicts: dict, image, ndim: int) -> UnsupportedOpError:
    """``err`` with the largest streamable prefix named as the ``boundary=`` to use: the
    largest candidate (``diagnose.prefixes``) whose analysis succeeds, its head included,
    described with the trunk outputs that analysis has."""
    rejected = next((n for n in gm.graph.nodes if n.name == err.node), None)
    for spec, node in diagnose.prefixes(gm, states, verdicts, image, rejected):
        trial = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # analyze rewrites the graph
        try:
            analysis = analyze(trial, spec, ndim)
            head_nodes(analysis)
        except FxStreamError:
            continue
        others = [o.name for o in analysis.outputs[:-1]]
        described = diagnose.describe_prefix(spec, node, others, verdicts, image)
        message = f"{err}\n  largest streamable prefix: {described}"
        return UnsupportedOpError(message, node=err.node, module_path=err.module_path, op=err.op, boundary=spec)
    return err


def _regroup_channels(node: fx.Node, layouts: dict, roots: dict, states: dict) -> bool:
    """Rewrite a channel-only view into ``channel_ops.regroup`` (see ``fxstream.ops.channel_ops``)."""
    found = channel_ops.channel_view(node, layouts, roots, lambda a: isinstance(a, fx.Node) and states.get(a) == SIZE)
    if found is None:
        return False
    x, shape, dims = found
    node.op, node.target, node.args, node.kwargs = "call_function", channel_ops.regroup, (x, shape, dims), {}
    return True


def _sized_like(node: fx.Node, layouts: dict, roots: dict, states: dict) -> bool:
    """Rewrite a tensor made from the spatial sizes of a trunk tensor into ``channel_ops.sized``,
    which reads them from its tile (see ``fxstream.channel_ops``)."""
    found = channel_ops.sized_factory(node, layouts, roots, lambda a: isinstance(a, fx.Node) and states.get(a) == SIZE)
    if found is None:
        return False
    node.op, node.target, node.args, node.kwargs = "call_function", channel_ops.sized, found, {}
    return True


def _place_guards(graph: fx.Graph, states: dict, layouts: dict, available: set) -> tuple[list, tuple]:
    """The size guards (Python decisions the concrete tracer took from sizes) the planner
    evaluates per input size, and those the head checks on every call: every guard is one
    or the other, or the model is rejected (a guard nobody checks would let another branch
    run silently)."""
    planned, head = [], []
    for guard in graph.nodes:
        if guard.op != "call_function" or guard.target is not size_guard:
            continue
        if states.get(guard) == SIZE and not _checked_in_head(guard, states, layouts, available):
            planned.append(guard)
        elif _head_reads(guard, layouts, available):
            head.append(guard)
        elif _reads_batch_size(guard, layouts, available):
            raise user_error(
                UnsupportedOpError,
                f"cannot stream a Python branch on {guard.args[2]}: it reads a size of a tensor inside the "
                "trunk that fxstream neither plans per input size (only spatial sizes) nor has in the head",
                node=guard,
                fix="compute the branch from the input's shape or from tensors, or pass boundary=... before it",
            )
        # else it reads channel sizes of trunk maps only: the same for every input of the model
    return planned, tuple(head)


def _reads_batch_size(guard: fx.Node, layouts: dict, available: set) -> bool:
    """Whether ``guard`` reads the batch size (dim 0) of a trunk map the head does not have,
    or a whole shape of one (conservatively: it may compare the batch size)."""
    seen, stack = set(), [guard]
    while stack:
        node = stack.pop()
        for source in node.all_input_nodes:
            if source in layouts and source not in available:
                if not _reads_dims_other_than_batch(node, source, len(layouts[source])):
                    return True
            elif source not in seen and source not in layouts:
                seen.add(source)
                stack.append(source)
    return False


def _reads_dims_other_than_batch(reader: fx.Node, source: fx.Node, ndim: int) -> bool:
    """``reader`` is ``source.size(d)``, or ``source.shape``/``source.size()`` whose every
    use is an index ``d``, with ``d`` not the batch dim 0."""
    if reader.op == "call_method" and reader.target == "size" and len(reader.args) > 1:
        return _not_batch(reader.args[1], ndim)
    if _is_shape(reader) and reader.users:
        return all(
            u.op == "call_function" and u.target is operator.getitem and _not_batch(u.args[1], ndim)
            for u in reader.users
        )
    return False


def _not_batch(dim, ndim: int) -> bool:
    return isinstance(dim, int) and dim % ndim != 0


def _head_reads(guard: fx.Node, layouts: dict, available: set) -> bool:
    """Whether every trunk map ``guard`` reads (through its inputs) is one the head has."""
    seen, stack = set(), [guard]
    while stack:
        for node in stack.pop().all_input_nodes:
            if node in layouts:
                if node not in available:
                    return False
            elif node not in seen:
                seen.add(node)
                stack.append(node)
    return True


def _checked_in_head(guard: fx.Node, states: dict, layouts: dict, available: set) -> bool:
    """Whether ``guard`` reads a value the planner does not know (a batch or channel size, a
    dtype: ``torch.empty([B, 0, H // 2, W // 2]).size(1) == 0`` in smp's Segformer) from the
    image and trunk outputs only, so that the head can check it on every call instead."""
    planned, seen, stack = True, set(), [guard]
    while stack:
        for node in stack.pop().all_input_nodes:
            if node in layouts:
                if node not in available:
                    return False  # a trunk map the head does not have
                continue
            planned = planned and states.get(node) in (SIZE, SHAPE)
            if node not in seen:
                seen.add(node)
                stack.append(node)
    return not planned


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
    used |= _sized_by_head(trunk, used, graph)
    return tuple(n for n in graph.nodes if n in used)


def _sized_by_head(trunk: set, outputs: set, graph: fx.Graph) -> set:
    """Trunk nodes the head reads only through size queries (``n, c = x.shape[:2]`` in
    resnest's split attention): they are outputs too, so the head reads their assembled maps."""
    found, seen = set(), set()
    stack = [n for n in graph.nodes if n.op == "output"]
    while stack:
        node = stack.pop()
        if node in seen or node in outputs:
            continue
        seen.add(node)
        if node in trunk:
            found.add(node)
            continue
        stack.extend(node.all_input_nodes)
    return found


def head_nodes(analysis: Analysis) -> set:
    """The nodes the graph output needs, given the trunk outputs as computed values."""
    trunk = set(analysis.trunk)
    outputs = set(analysis.outputs)
    needed: set = set()
    stack = [n for n in analysis.gm.graph.nodes if n.op in ("output", "placeholder")] + list(analysis.head_guards)
    while stack:
        node = stack.pop()
        if node in needed or node in outputs:
            continue
        if node in trunk:  # cannot happen: analyze makes every trunk node the head reads an output
            raise BoundaryError(f"planner: the rest of the model reads '{node.name}', which is not a trunk output")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    return needed
