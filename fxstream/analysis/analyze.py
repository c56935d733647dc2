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
(global pooling, flatten). Any op the op table rejects or does not know is rejected.

**Global statistics** (issue 20, ``docs/design-statistics.md``). A reduction over every
pixel that streams as partial sums (``ops.statistics.Statistic``: mean, sum, var, norm,
adaptive average pooling) is a *reducer*; a norm with a spatial input (GroupNorm,
InstanceNorm, train-mode BatchNorm) is rewritten into one (``ops.statistics.decompose``).
A reducer whose value flows back, through non-spatial nodes (the *statistic head*: SE's
MLP, ``rsqrt(var + eps)``, PSP's 1x1 conv), into a trunk node is a *statistic*: the trunk
node is an *application* (a pointwise use, or a *broadcast-back*
``interpolate(grid, size=x.shape[2:])``, which becomes a spatial node of ``x``'s size). A
reducer whose value does not flow back ends the trunk, as before. Levels: a statistic's is
1 + the *depth* of its input, a trunk node's depth the highest level it depends on
(``fxstream.analysis.levels``). Global values that are not statistics (flatten, a reduction
over some spatial axes, max pooling) flowing back are rejected, as are statistics used other
than pointwise.
"""

from __future__ import annotations

import copy
import dataclasses
import operator
from dataclasses import dataclass, field

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F

from ..errors import BoundaryError, FxStreamError, UnsupportedOpError, describe, module_path, user_error
from ..frontend.functionalize import functionalize
from ..frontend.tracecheck import check_inplace_state, size_guard
from ..ops import channel_ops, statistics
from ..ops import geometry as g
from ..ops import table as ops
from . import diagnose, levels
from .names import find_boundary

SPATIAL, GLOBAL, CONST, OTHER = "spatial", "global", "const", "other"
SHAPE = "shape"  # x.shape / x.size() of a spatial tensor: global, but indexable per dim
METADATA = ("ndim", "dtype", "device", "is_cuda", "layout", "requires_grad")
SIZE = "size"  # computed from spatial sizes; evaluated per input size (see plan.node_sizes)
# x.new_empty(shape) and the like read only x's dtype and device: timm's DropPath draws its
# per-sample mask with x.new_empty((N, 1, 1, 1)).bernoulli_(keep)
NEW_TENSOR_METHODS = ("new_empty", "new_zeros", "new_ones", "new_full")
OPAQUE = -1  # the level of a global value that is not a statistic (flatten, a partial reduction...)
MAX_LEVELS = 4  # compile(..., max_levels=) default: more dependent levels of statistics are refused


@dataclass(frozen=True)
class StatisticInfo:
    """One statistic: its reducer node, spatial input, reduction, level, category
    (``diagnose``: global norm, squeeze-excitation, global pooling branch...) and op name."""

    node: fx.Node
    input: fx.Node
    spec: statistics.ReductionSpec
    level: int
    category: str
    op: str


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
    # global statistics (issue 20): in graph order
    statistics: tuple = ()  # StatisticInfo of every statistic the trunk reads back
    values: tuple = ()  # (global fx.Node, level): the statistic values trunk nodes read
    heads: tuple = ()  # the statistic head: global fx.Nodes between the statistics and the values
    depth: dict = field(default_factory=dict)  # trunk node (and image) -> the highest level it depends on
    level: dict = field(default_factory=dict)  # statistic, head and value node -> its level
    decomposed: tuple = ()  # (module path or node name, op, first node name) of each decomposed norm

    @property
    def output(self) -> fx.Node:
        """The primary trunk output (the last in topological order): the tiles are its blocks."""
        return self.outputs[-1]

    @property
    def levels(self) -> int:
        """``L``: the highest level of a statistic (0 without statistics)."""
        return max((s.level for s in self.statistics), default=0)


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    dag = nx.DiGraph()
    for node in graph.nodes:
        dag.add_node(node)
        for inp in node.all_input_nodes:
            dag.add_edge(inp, node)
    return dag


def analyze(
    gm: fx.GraphModule,
    boundary: str | tuple[str, ...] | None = None,
    ndim_hint: int | None = None,
    max_levels: int | None = MAX_LEVELS,
    statistics: bool = True,
) -> Analysis:
    """Find the trunk. ``boundary``: the last streamed op, or several (one per trunk output);
    the trunk is what they need. ``ndim_hint`` (from a per-dim tile_size) is used only when no
    convolution or pooling op tells the number of spatial dims. ``max_levels``: more levels of
    global statistics raise :class:`StatisticsError` (None: no limit). ``statistics=False``:
    reject them all, as fxstream 0.1 did."""
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
    walk = _Walk(gm, image, ndim, scope, statistics)
    states, verdicts = walk.states, walk.verdicts
    try:
        walk.run()
        later = None
    except UnsupportedOpError as err:
        if not walk.unknown:
            if boundary is not None:
                raise
            raise _with_prefix(err, gm, walk.prefix_states(), verdicts, image, ndim, max_levels) from None
        later = err
    if walk.unknown:  # looked past it: name a non-local op further on too
        err, before, verdicts_before = walk.unknown[0]
        err = _with_later(err, later)
        if boundary is not None:
            raise err
        raise _with_prefix(err, gm, walk.prefix_states(before), verdicts_before, image, ndim, max_levels) from None
    layouts, dynamic = walk.layouts, walk.dynamic
    dag = to_networkx(graph)  # channel-only views were rewritten, norms decomposed
    trunk_nodes = {n for n, s in states.items() if s == SPATIAL and n is not image}
    if boundary is not None:
        trunk_nodes &= walk.scope
        for spec, end in ends.items():
            end = walk.replaced.get(end, end)
            if end not in trunk_nodes:
                raise BoundaryError(
                    f"boundary={spec!r} resolves to node '{end.name}', which is not a full-resolution "
                    "tensor computed from the image; name a convolution, activation or block output"
                )
    reads_back = _statistics(trunk_nodes, states, walk.reducers)
    outputs = _trunk_outputs(trunk_nodes, states, dag, graph, reads_back)
    check_inplace_state(gm, outputs[-1])
    needed = set(outputs).union(*(nx.ancestors(dag, o) for o in outputs))
    trunk = [n for n in graph.nodes if n in trunk_nodes and n in needed]
    constants = _trunk_constants(graph, states, set(trunk), needed)
    dynamic = frozenset(n for n in trunk if n in dynamic)
    guards, head_guards = _place_guards(graph, states, layouts, set(outputs) | {image})
    size_needed = set(guards).union(*(nx.ancestors(dag, n) for n in list(dynamic) + guards))
    size_nodes = [n for n in graph.nodes if n in size_needed and states.get(n) in (SIZE, SHAPE)]
    analysis = Analysis(gm, image, trunk, constants, outputs, verdicts, layouts, ndim, dynamic, size_nodes, head_guards)
    if reads_back:
        try:
            analysis = _with_statistics(analysis, walk, needed, dag)
        except UnsupportedOpError as err:  # a statistic's head that the passes cannot run
            if boundary is not None:
                raise
            before = _before(gm, verdicts, err.node)
            raise _with_prefix(err, gm, walk.prefix_states(), before, image, ndim, max_levels) from None
    if max_levels is not None and analysis.levels > max_levels:
        prefix = None
        if boundary is None:  # the largest prefix before the first node beyond max_levels
            first = next(n for n in analysis.trunk if analysis.depth[n] > max_levels)
            before = _before(gm, verdicts, first.name)
            prefix = _prefix(gm, walk.prefix_states(), before, image, ndim, first.name, max_levels)
        raise levels.refusal(analysis, max_levels, dag, prefix)
    return analysis


def _before(gm: fx.GraphModule, verdicts: dict, name: str) -> dict:
    """The verdicts of the nodes before node ``name`` in the graph (those classified before it
    when the walk stops there)."""
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    limit = order.get(name, len(order))
    return {n: v for n, v in verdicts.items() if order.get(n.name, 0) < limit}


def _statistics(trunk: set, states: dict, reducers: dict) -> frozenset:
    """The candidate reducers whose value reaches a trunk node through non-spatial nodes."""
    found, seen = set(), set()
    stack = [i for n in trunk for i in n.all_input_nodes if states.get(i) == GLOBAL]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in reducers:
            found.add(node)
        else:
            stack.extend(i for i in node.all_input_nodes if states.get(i) == GLOBAL)
    return frozenset(found)


def _trunk_constants(graph: fx.Graph, states: dict, trunk: set, needed: set) -> list:
    """The const and shape nodes the trunk nodes read, directly or through other such nodes."""
    found: set = set()
    stack = [i for n in trunk for i in n.all_input_nodes if states.get(i) in (CONST, SHAPE)]
    while stack:
        node = stack.pop()
        if node in found:
            continue
        found.add(node)
        stack.extend(i for i in node.all_input_nodes if states.get(i) in (CONST, SHAPE))
    return [n for n in graph.nodes if n in found and n in needed and n.op != "output"]


def _with_statistics(analysis: Analysis, walk: _Walk, needed: set, dag: nx.DiGraph) -> Analysis:
    """``analysis`` with its statistics, values, statistic head and depths (see the module
    docstring); rejects a statistic head that the driver cannot run on its own."""
    gm, states = analysis.gm, walk.states
    graph = gm.graph
    trunk = set(analysis.trunk)
    reducers = [n for n in graph.nodes if n in walk.reducers and n in needed]
    heads = [n for n in graph.nodes if n in needed and states.get(n) == GLOBAL and n not in walk.reducers]
    values = [n for n in graph.nodes if n in needed and states.get(n) == GLOBAL and any(u in trunk for u in n.users)]
    output = next(n for n in graph.nodes if n.op == "output")
    model_needs = nx.ancestors(dag, output) | {output}
    for node in heads + reducers:
        _check_head(node, walk, needed, model_needs)
    kinds = {first: kind for _, kind, first in walk.decomposed}
    infos = []
    for node in reducers:
        spec, source = walk.reducers[node]
        decomposed = node.meta.get("fxstream_decomposed")
        if decomposed is not None:
            category, op = diagnose.GLOBAL_NORM, kinds.get(node.name, "norm")
        else:
            category, op = _category(gm, node, trunk, states, analysis.verdicts), diagnose.op_name(gm, node)
        infos.append(StatisticInfo(node, source, spec, walk.level[node], category, op))
    depth = {n: walk.depth[n] for n in [analysis.image] + analysis.trunk}
    return dataclasses.replace(
        analysis,
        statistics=tuple(infos),
        values=tuple((v, walk.level[v]) for v in values),
        heads=tuple(heads),
        depth=depth,
        level={n: walk.level[n] for n in heads + reducers},
        decomposed=tuple(walk.decomposed),
    )


def _check_head(node: fx.Node, walk: _Walk, needed: set, model_needs: set) -> None:
    """The statistic head runs between the passes, with the statistics as its only image
    data: it may not read another model input or a size of a trunk tensor, and the model's
    own head may not read it. Rejected at the trunk node that reads the statistic back."""
    for inp in node.all_input_nodes:
        state = walk.states.get(inp)
        if state == OTHER or state in (SHAPE, SIZE) or inp in walk.sized:
            what = "another model input" if state == OTHER else "the size of a streamed tensor"
            raise _head_error(
                node,
                walk,
                f"its head (the ops between the reduction and the image) reads '{inp.name}', {what}, which the "
                "statistics passes do not provide",
                "compute the statistic's head from the reduction and parameters only (keepdim=True instead of a view "
                "with sizes), or pass boundary=... to stream only the part before it",
            )
    for user in node.users:
        if user not in needed and user in model_needs:
            raise _head_error(
                node,
                walk,
                f"the model's head reads it too ('{user.name}'); fxstream returns only full-resolution maps from "
                "the trunk",
                "compute the head's copy of the statistic from a trunk output, or pass boundary=... to stream only "
                "the part before it",
            )


def _head_error(node: fx.Node, walk: _Walk, why: str, fix: str) -> UnsupportedOpError:
    """An error at the first trunk node that reads ``node`` (a statistic's head node) back."""
    reader, stack, seen = None, [node], set()
    while stack and reader is None:
        for user in stack.pop(0).users:
            if walk.states.get(user) == SPATIAL:
                reader = user
                break
            if user not in seen and walk.states.get(user) == GLOBAL:
                seen.add(user)
                stack.append(user)
    at = reader if reader is not None else node
    category = diagnose.global_category(walk.gm, at, node, walk.states) if reader is not None else ""
    module = walk.gm.get_submodule(at.target) if at.op == "call_module" else None
    label = f"{category}: " if category else ""
    return _unsupported(at, module, f"{label}it reads back the global statistic '{node.name}', but {why}", fix)


def _category(gm: fx.GraphModule, reducer: fx.Node, trunk: set, states: dict, verdicts: dict) -> str:
    """The kind of block a statistic belongs to, named from its first application."""
    seen, stack = set(), [reducer]
    while stack:
        node = stack.pop(0)
        for user in node.users:
            if user in trunk:
                verdict = verdicts.get(user)
                if isinstance(verdict, ops.Window) and verdict.kind == "broadcast":
                    return diagnose.POOLING_BRANCH
                return diagnose.global_category(gm, user, reducer, states)
            if user not in seen and states.get(user) == GLOBAL:
                seen.add(user)
                stack.append(user)
    return diagnose.GLOBAL_REDUCTION


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


class _Walk:
    """Gives every node a state in one pass over the graph (:meth:`visit`): ``states``,
    ``verdicts`` (read on errors), ``layouts``, the dynamic nodes, and for global statistics
    ``depth`` (spatial nodes), ``level`` (global nodes) and the candidate ``reducers``. A norm
    is rewritten into reducer + head + application nodes, which are visited in its place."""

    def __init__(self, gm: fx.GraphModule, image: fx.Node, ndim: int, scope: set | None, statistics: bool = True):
        self.gm, self.image, self.ndim = gm, image, ndim
        self.statistics = statistics  # False: every global value flowing back is rejected (fxstream 0.1)
        self.scope = scope
        self.states: dict = {}
        self.verdicts: dict = {}
        self.layouts: dict = {image: (None, None) + tuple(range(ndim))}
        self.dynamic: set = set()
        self.roots: dict = {image: image}  # spatial node -> a node of the same spatial size
        self.depth: dict = {image: 0}
        self.level: dict = {}
        self.reducers: dict = {}  # candidate reducer -> (ReductionSpec, its spatial input)
        self.sized: set = set()  # const nodes computed from a spatial tensor's batch/channel sizes
        self.replaced: dict = {}  # decomposed node -> its application
        self.decomposed: list = []
        self.unknown: list = []  # the first unknown op: (its error, states and verdicts before it)

    def run(self) -> None:
        for node in list(self.gm.graph.nodes):
            if node.op != "output" and node not in self.replaced:
                self.visit(node)

    def prefix_states(self, states: dict | None = None) -> dict:
        """``states`` (default: the walk's) for ``diagnose.prefixes``: a reducer never keeps a
        node out of a prefix (streamed, or a head reduction of the prefix)."""
        states = self.states if states is None else states
        return {n: CONST if n in self.reducers else state for n, state in states.items()}

    def visit(self, node: fx.Node) -> None:
        states = self.states
        if node.op == "placeholder":
            states[node] = SPATIAL if node is self.image else OTHER
            return
        if node.op == "get_attr":
            states[node] = CONST
            return
        inputs = node.all_input_nodes
        input_states = {states.get(n, CONST) for n in inputs}
        size_state = _size_query(node, self.layouts)
        if size_state is not None:
            states[node] = size_state
            if size_state == CONST:
                self.sized.add(node)
            return
        if self.scope is not None and node not in self.scope:
            states[node] = GLOBAL if SPATIAL in input_states else _merge_non_spatial(input_states)
            self.level[node] = OPAQUE
            return
        if node.op == "call_method" and node.target in NEW_TENSOR_METHODS and node.args[0] in self.layouts:
            others = {states.get(n, CONST) for n in inputs if n is not node.args[0]}
            if not others & {SPATIAL, SIZE}:  # a tensor of a shape that no pixel or spatial size sets
                states[node] = _merge_non_spatial(others)
                self.level[node] = self._merged_level([n for n in inputs if n is not node.args[0]])
                return
        if SIZE in input_states and _sized_like(node, self.layouts, self.roots, states):
            inputs = node.all_input_nodes
            input_states = {states.get(n, CONST) for n in inputs}
        if SPATIAL not in input_states:
            broadcast = self._broadcast(node, input_states) if self.statistics else None
            if broadcast is not None:
                self._spatial(node, broadcast, [broadcast.params["grid"]], [broadcast.input])
                return
            states[node] = _merge_non_spatial(input_states)
            self.level[node] = self._merged_level(inputs)
            if states[node] == CONST and any(n in self.sized for n in inputs):
                self.sized.add(node)
            return
        module = self.gm.get_submodule(node.target) if node.op == "call_module" else None
        ctx = ops.OpContext(node, module, self.layouts, self.ndim)
        self._check_application(node, module, ctx)
        verdict = self._classify(node, module, ctx, input_states)
        if isinstance(verdict, statistics.Decompose):
            self._decompose(node, module, verdict)
            return
        if isinstance(verdict, statistics.Statistic):  # a reducer: a statistic if its value flows back
            source = ctx.spatial_inputs()[0]
            states[node] = GLOBAL
            self.level[node] = self.depth[source] + 1
            self.reducers[node] = (verdict.spec, source)
            return
        if isinstance(verdict, ops.Reduction):
            states[node] = GLOBAL
            self.level[node] = OPAQUE
            return
        if isinstance(verdict, ops.Unknown) and not self.unknown and isinstance(ops.pointwise(ctx), ops.Local):
            error = _unsupported(node, module, verdict.reason, verdict.fix)
            self.unknown.append((error, dict(states), dict(self.verdicts)))
            verdict = ops.pointwise(ctx)
        elif isinstance(verdict, ops.Rejected):
            category = diagnose.rejected_category(verdict.reason, module, node)
            reason = f"{category}: {verdict.reason}" if category else verdict.reason
            raise _unsupported(node, module, reason, verdict.fix)
        values = self._check_inputs(node, module, ctx)
        self._spatial(node, verdict, values, ctx.spatial_inputs())

    def _classify(self, node, module, ctx, input_states):
        if SIZE in input_states and ops.pools_whole_map(ctx):  # F.avg_pool2d(x, x.shape[2:])
            found = statistics.whole_map_mean(ctx.layout, self.ndim) if _plain_pooling(ctx) else None
            return found if found is not None else ops.Reduction()
        broadcast = self._expand_as(node) if self.statistics else None
        if broadcast is not None:
            return broadcast
        if SIZE in input_states and _regroup_channels(node, self.layouts, self.roots, self.states):
            input_states = {self.states.get(n, CONST) for n in node.all_input_nodes}
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
            self.dynamic.add(node)
            ctx.pending = True
        try:
            return ops.classify(ctx) if self.statistics else ops.classify_rows(ctx)
        except Exception as exc:  # malformed arguments: report as unsupported, naming the node
            return ops.Rejected(f"fxstream could not read its arguments ({exc})", ops.BOUNDARY_FIX)

    def _spatial(self, node: fx.Node, verdict, values: list, spatial_inputs: list) -> None:
        self.states[node] = SPATIAL
        self.verdicts[node] = verdict
        if verdict.layout is not None:
            self.layouts[node] = verdict.layout
        elif verdict.kind == "broadcast":
            self.layouts[node] = (None, None) + tuple(range(self.ndim))
        else:
            self.layouts[node] = self.layouts[verdict.input]
        local = isinstance(verdict, ops.Local)
        self.roots[node] = self.roots.get(spatial_inputs[0], node) if local else node
        depths = [self.depth.get(n, 0) for n in spatial_inputs] + [self.level[v] for v in values]
        self.depth[node] = max(depths, default=0)

    def _merged_level(self, inputs: list) -> int:
        found = [self.level.get(n, 0) for n in inputs]
        if any(self.states.get(n) == SHAPE for n in inputs) or OPAQUE in found:
            return OPAQUE  # depends on the image's sizes, not on a statistic
        return max(found, default=0)

    def _decompose(self, node: fx.Node, module, verdict: statistics.Decompose) -> None:
        """Rewrite a norm (``statistics.decompose``) and visit its nodes in its place."""
        kind = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
        created = statistics.decompose(self.gm.graph, node, verdict, kind)
        self.replaced[node] = created[-1]
        self.decomposed.append((verdict.owner or node.name, kind, created[0].name))
        if self.scope is not None and node in self.scope:
            self.scope |= set(created)
        for new in created:
            self.visit(new)

    def _check_inputs(self, node: fx.Node, module, ctx) -> list:
        """The statistic values ``node`` reads (an application), after checking every non-spatial
        input: another model input, a global value that is not a statistic, or a statistic used
        other than pointwise is rejected."""
        values = []
        for inp in node.all_input_nodes:
            state = self.states.get(inp)
            if state == OTHER:
                raise _unsupported(
                    node,
                    module,
                    f"it uses '{inp.name}', a model input other than the image",
                    "stream a model whose trunk depends on the image alone, or pass boundary=... "
                    "to stop streaming before this op",
                )
            if state != GLOBAL:
                continue
            source = _global_source(inp, self.states)
            category = diagnose.global_category(self.gm, node, source, self.states)
            if self.level.get(inp, OPAQUE) < 1:
                raise _unsupported(
                    node,
                    module,
                    f"{category}: it combines the image with '{source.name}' (module "
                    f"'{module_path(source) or '<top>'}'), which depends on the whole image in a way fxstream does "
                    f"not stream ({_opaque_why(source)})",
                    "pass boundary=<a node before the reduction> to stream only the part before it, "
                    "or remove the global block",
                )
            values.append(inp)
        return values

    def _check_application(self, node: fx.Node, module, ctx) -> None:
        """A statistic may only be read pointwise (or resampled back, ``grid.expand_as(x)``)."""
        for inp in node.all_input_nodes:
            if self.states.get(inp) != GLOBAL or self.level.get(inp, OPAQUE) < 1:
                continue
            if _pointwise(ctx) or (node.op == "call_method" and node.target == "expand_as"):
                continue
            category = diagnose.global_category(self.gm, node, _global_source(inp, self.states), self.states)
            raise _unsupported(
                node,
                module,
                f"{category}: it reads '{inp.name}', a global statistic, other than pointwise (fxstream "
                "streams statistics applied pixel by pixel: x * gate, (x - mean) * rstd, "
                "interpolate(grid, size=x.shape[2:]))",
                "pass boundary=<a node before the reduction> to stream only the part before it",
            )

    def _broadcast(self, node: fx.Node, input_states: set) -> ops.Window | None:
        """``F.interpolate(grid, size=x.shape[2:])`` (or ``size=(x.size(2), x.size(3))``) of a
        statistic grid: a spatial node of ``x``'s size (a broadcast-back)."""
        if node.op != "call_function" or node.target not in (F.interpolate, F.upsample):
            return None
        arg = lambda i, name, default=None: node.args[i] if i < len(node.args) else node.kwargs.get(name, default)  # noqa: E731
        grid = arg(0, "input")
        if self.states.get(grid) != GLOBAL or self.level.get(grid, OPAQUE) < 1 or arg(6, "antialias", False):
            return None
        source = self._size_source(arg(1, "size"))
        mode = ops._MODES.get(arg(3, "mode", "nearest"))
        if source is None or mode is None or arg(2, "scale_factor") is not None:
            return None
        return self._broadcast_window(source, grid, mode, bool(arg(4, "align_corners")))

    def _expand_as(self, node: fx.Node) -> ops.Window | None:
        """``grid.expand_as(x)`` of a statistic with a spatial ``x``: a broadcast-back."""
        if node.op != "call_method" or node.target != "expand_as" or len(node.args) != 2:
            return None
        grid, source = node.args
        if self.states.get(grid) != GLOBAL or self.level.get(grid, OPAQUE) < 1 or source not in self.layouts:
            return None
        if self.layouts[source] != (None, None) + tuple(range(self.ndim)):
            return None
        return self._broadcast_window(source, grid, "nearest", False)

    def _broadcast_window(self, source: fx.Node, grid: fx.Node, mode: str, align_corners: bool) -> ops.Window:
        stencils = (g.IDENTITY,) * self.ndim  # the size of its source, read through an identity
        return ops.Window("broadcast", source, stencils, params=dict(grid=grid, mode=mode, align_corners=align_corners))

    def _size_source(self, size) -> fx.Node | None:
        """The spatial node whose spatial size ``size`` is, all its spatial dims in order:
        ``x.shape[2:]``, ``x.size()[-2:]``, ``(x.size(2), x.shape[3])`` or the items of
        ``h, w = x.shape[2:]``; else None."""
        axes = tuple(range(self.ndim))
        if isinstance(size, (tuple, list)):
            found = [self._size_dims(item) for item in size]
            if any(f is None or len(f[1]) != 1 for f in found) or len({f[0] for f in found}) != 1:
                return None
            source, dims = found[0][0], tuple(f[1][0] for f in found)
        else:
            found = self._size_dims(size)
            if found is None:
                return None
            source, dims = found
        layout = self.layouts[source]
        return source if tuple(layout[d] for d in dims) == axes else None

    def _size_dims(self, node) -> tuple[fx.Node, tuple[int, ...]] | None:
        """``(spatial node, its dims)`` whose sizes the size expression ``node`` holds."""
        if not isinstance(node, fx.Node):
            return None
        if _is_shape(node) and node.args[0] in self.layouts:  # x.shape, x.size()
            return node.args[0], tuple(range(len(self.layouts[node.args[0]])))
        if node.op == "call_method" and node.target == "size" and len(node.args) == 2 and node.args[0] in self.layouts:
            source, dim = node.args
            return (source, (dim % len(self.layouts[source]),)) if isinstance(dim, int) else None
        if node.op == "call_function" and node.target is operator.getitem:
            inner = self._size_dims(node.args[0])
            index = node.args[1]
            if inner is None or not isinstance(index, (int, slice)):
                return None
            picked = inner[1][index]
            return inner[0], (picked,) if isinstance(index, int) else tuple(picked)
        return None


def _plain_pooling(ctx) -> bool:
    """Only kernel_size given (stride = kernel, no padding): one window over the whole map."""
    return len(ctx.node.args) <= 2 and not ctx.node.kwargs


def _pointwise(ctx) -> bool:
    """Whether the table classifies the node as a pointwise op (its non-spatial inputs broadcast)."""
    node = ctx.node
    if node.op == "call_function":
        rule = ops.function_rule(node.target)
    elif node.op == "call_method":
        rule = ops.METHODS.get(node.target)
    else:
        rule = ops.MODULES.get(type(ctx.module))
    return rule is ops.pointwise


def _opaque_why(source: fx.Node) -> str:
    return (
        "a reduction over some spatial axes but not all, a max, a flatten or a view of the pixels; fxstream streams "
        "sums, means, variances and norms over every pixel, and adaptive average pooling"
    )


def _with_later(err: UnsupportedOpError, later: UnsupportedOpError | None) -> UnsupportedOpError:
    """``err`` (an unknown op) with the first line of ``later``, a rejection further on."""
    if later is None:
        return err
    where = f"node '{later.node}'" + (f" in module '{later.module_path}'" if later.module_path else "")
    message = f"{err}\n  further on, if that op is local: {str(later).splitlines()[0]} ({where})"
    return UnsupportedOpError(message, node=err.node, module_path=err.module_path, op=err.op)


def _with_prefix(
    err: UnsupportedOpError, gm, states: dict, verdicts: dict, image, ndim: int, max_levels: int | None = MAX_LEVELS
) -> UnsupportedOpError:
    """``err`` with the largest streamable prefix named as the ``boundary=`` to use (:func:`_prefix`)."""
    found = _prefix(gm, states, verdicts, image, ndim, err.node, max_levels)
    if found is None:
        return err
    spec, _, described = found
    message = f"{err}\n  largest streamable prefix: {described}"
    return UnsupportedOpError(message, node=err.node, module_path=err.module_path, op=err.op, boundary=spec)


def _prefix(gm, states: dict, verdicts: dict, image, ndim: int, rejected_name: str, max_levels: int | None):
    """``(boundary, its node, its description)`` of the largest candidate (``diagnose.prefixes``)
    before node ``rejected_name`` whose analysis succeeds, its head included, described with the
    trunk outputs that analysis has; or None."""
    rejected = next((n for n in gm.graph.nodes if n.name == rejected_name), None)
    for spec, node in diagnose.prefixes(gm, states, verdicts, image, rejected):
        trial = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # analyze rewrites the graph
        try:
            analysis = analyze(trial, spec, ndim, max_levels)
            head_nodes(analysis)
        except FxStreamError:
            continue
        others = [o.name for o in analysis.outputs[:-1]]
        return spec, node, diagnose.describe_prefix(spec, node, others, verdicts, image)
    return None


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


def _trunk_outputs(
    trunk: set, states: dict, dag: nx.DiGraph, graph: fx.Graph, reducers: frozenset = frozenset()
) -> tuple:
    """The trunk nodes the rest of the model reads, in topological order: each is streamed
    and assembled whole. Size queries do not count as uses: those of batch/channel dims
    (const) are evaluated per tile, those of spatial dims per input size. Nor do the
    statistics' reducers (``reducers``): their sums are streamed."""
    metadata = (CONST, SHAPE, SIZE)
    used = {
        n
        for n in trunk
        if any(u not in trunk and u not in reducers and states.get(u) not in metadata for u in dag.successors(n))
    }
    used |= _sized_by_head(trunk, used, graph)
    if not used:
        raise BoundaryError("nothing to stream: no full-resolution op reads the image before the first global op")
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
