"""Stage 4, generate: :class:`Analysis` + :class:`TrunkGeometry` -> FX graphs.

* the *tile graph* computes one tile: ``forward(x, geometry, carry)`` takes the image
  crop, the tile's geometry tuple (plain ints from the ShapePlan) and the executor's
  :class:`~fxstream.runtime.executor.TileRun`. Every node that other nodes read passes through
  ``carry.region(name, cell)``, which returns the region its consumers read (under the
  carry schedule, the cell with the stripes of earlier tiles). Every spatial edge goes
  through ``fxstream.runtime.kernels.window`` (crop to the region the consumer reads, pad at the
  image border), and window ops run with ``padding=0``;
* the *outer graph* is the original graph with the trunk replaced by one call to the
  ``fxstream_trunk`` module (:class:`StreamedTrunk`), followed by the unchanged head.

Example tile code for ``Conv2d(3, 8, 3, padding=1) -> ReLU``::

    def forward(self, x, geometry, carry):
        getitem = geometry[0]
        window = fxstream_runtime_kernels_window(x, getitem, 'constant', 0.0)
        conv_weight = self.conv.weight
        conv_bias = self.conv.bias
        conv = torch.conv2d(window, conv_weight, conv_bias, (1, 1), 0, (1, 1), 1)
        ...
"""

from __future__ import annotations

import itertools
import operator
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..analysis.analyze import Analysis, head_nodes
from ..errors import InputShapeError
from ..io import arrays, transfer
from ..ops import statistics
from ..ops import table as ops
from ..ops.windows import WINDOWS, Emit, slot_getter
from ..planning.plan import Plan
from ..planning.schedule import as_schedule
from ..planning.tiling import ShapePlan, plan_shape
from ..planning.trunk import TrunkGeometry
from . import channels, kernels, passes, progress, rng, threads
from .executor import StreamFunction
from .settings import StreamSettings, check_block
from .stripes import Stripes

# The run-time functions that window kinds emit calls to (see ``ops.windows.Emit``).
HELPERS = types.SimpleNamespace(
    window=kernels.window, avg_pool=kernels.avg_pool, resample=kernels.resample, broadcast=kernels.broadcast
)


def tile_graph(analysis: Analysis, geo: TrunkGeometry, level: int | None = None) -> fx.Graph:
    """The tile code of the output pass (``level`` None), or of statistics pass ``level``: the
    nodes of ``A_level`` only, returning per level-``level`` statistic its partial sums over the
    tile's owned block (``ops.statistics.partial``). With global statistics the code takes a
    fourth input, ``values``: the statistic values the pass reads (:func:`pass_values`), as
    constants."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    geometry = graph.placeholder("geometry")
    carry = graph.placeholder("carry")
    values = graph.placeholder("values") if geo.statistics else None
    env: dict = {analysis.image: x}
    index = {name: i for i, name in enumerate(pass_values(analysis, geo, level))}
    members = None if level is None else set(geo.passes[level - 1])
    producers = {p for step in geo.steps for p in step.inputs}
    by_name = {n.name: n for n in [analysis.image] + analysis.trunk}
    steps = dict(zip(analysis.trunk, geo.steps))
    constants = set(analysis.constants)
    if members is not None:  # a pass copies the constants its nodes read
        constants = _read_constants([n for n in analysis.trunk if n.name in members], constants)

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env and n.name in index:  # a statistic value: a constant of this pass
            env[n] = graph.create_node("call_function", operator.getitem, (values, index[n.name]), name=n.name)
        return env[n]

    for node in analysis.gm.graph.nodes:
        if node in constants:  # parameters, literals, batch/channel size queries
            env[node] = graph.node_copy(node, lookup)
            continue
        if node not in steps or (members is not None and node.name not in members):
            continue
        step = steps[node]
        verdict = analysis.verdicts[node]
        windows = {}
        reads = not isinstance(verdict, ops.Window) or WINDOWS[verdict.kind].reads_input
        for producer in step.inputs if reads else ():
            spec = graph.call_function(operator.getitem, (geometry, geo.slot("window", step.name, producer)))
            args = (env[by_name[producer]], spec)
            if isinstance(verdict, ops.Window) and verdict.value != 0.0:
                args += (verdict.value,)
            windows[by_name[producer]] = graph.call_function(kernels.window, args)
        if isinstance(verdict, ops.Local):
            env[node] = graph.node_copy(node, lambda n, windows=windows: windows[n] if n in windows else lookup(n))
        else:
            env[node] = _emit_window(graph, node, verdict, windows.get(verdict.input), lookup, geometry, geo)
        if node.name in producers:  # its region: its cell, and under carry the stripes of earlier tiles
            env[node] = graph.call_method("region", (carry, node.name, env[node]))
    if level is None:
        blocks = []
        for output in analysis.outputs:  # each output cropped to its block
            spec = graph.call_function(operator.getitem, (geometry, geo.slot("window", "", output.name)))
            blocks.append(graph.call_function(kernels.window, (env[output], spec)))
        graph.output(blocks[0] if len(blocks) == 1 else tuple(blocks))
    else:
        graph.output(
            tuple(_partial(graph, geo, stat, env, by_name, geometry) for stat in geo.statistics if stat.level == level)
        )
    graph.lint()
    return graph


def _read_constants(nodes: list, constants: set) -> set:
    """The constants among the inputs of ``nodes``, and the constants those read."""
    found: set = set()
    stack = [i for n in nodes for i in n.all_input_nodes if i in constants]
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(i for i in node.all_input_nodes if i in constants)
    return found


def _partial(graph: fx.Graph, geo: TrunkGeometry, stat, env: dict, by_name: dict, geometry: fx.Node) -> fx.Node:
    """A statistic's partial sums over the tile's owned block of its input (float64)."""
    spec = graph.call_function(operator.getitem, (geometry, geo.slot("window", stat.name, stat.input)))
    block = graph.call_function(kernels.window, (env[by_name[stat.input]], spec))
    position = None
    if stat.spec.kind == "adaptive_avg_pool":
        position = graph.call_function(operator.getitem, (geometry, geo.slot("position", stat.name, stat.input)))
    return graph.create_node("call_function", statistics.partial, (block, stat.spec, position), name=stat.name)


def pass_values(analysis: Analysis, geo: TrunkGeometry, level: int | None) -> tuple[str, ...]:
    """The statistic values that the nodes of pass ``level`` (None: the output pass) read, in
    ``geo.values`` order: the inputs of its ``StreamFunction`` and its tile code's ``values``."""
    members = {n.name for n in analysis.trunk} if level is None else set(geo.passes[level - 1])
    read = {i.name for n in analysis.trunk if n.name in members for i in n.all_input_nodes}
    return tuple(name for name, _ in geo.values if name in read)


def driver_graph(analysis: Analysis, geo: TrunkGeometry) -> fx.Graph:
    """The statistics passes and their heads, for a trunk with global statistics: per level
    ``j``, pass ``j`` (``passes.statistics``: the finished value of each level-``j`` statistic,
    given the values it reads), then the statistic head's nodes of level ``j``, copied from the
    traced graph (the model's own modules: their hooks fire once per call); last the output
    pass (``passes.stream``). ``forward(call)`` takes the call's :class:`passes.CallState`."""
    graph = fx.Graph()
    call = graph.placeholder("call")
    env: dict = {}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:  # a constant of the head (parameters, literals), copied where first read
            env[n] = graph.node_copy(n, lookup)
        return env[n]

    nodes = {v.name: v for v, _ in analysis.values}
    for level in range(1, geo.levels + 1):
        reads = [lookup(nodes[name]) for name in pass_values(analysis, geo, level)]
        result = graph.create_node(
            "call_function", passes.statistics, (call, level, *reads), name=f"statistics_{level}"
        )
        for k, stat in enumerate(s for s in analysis.statistics if s.level == level):
            env[stat.node] = graph.create_node("call_function", operator.getitem, (result, k), name=stat.node.name)
        for head in analysis.heads:
            if analysis.level[head] == level:
                env[head] = graph.node_copy(head, lookup)
    reads = [lookup(nodes[name]) for name in pass_values(analysis, geo, None)]
    graph.output(graph.create_node("call_function", passes.stream, (call, *reads), name="stream"))
    graph.lint()
    return graph


def value_checks(analysis: Analysis) -> dict:
    """Statistic value -> ``(rank, spatial dims)`` of each trunk node that reads it pointwise:
    there the value must have size 1 along those dims (aligned from the right, as broadcasting
    aligns them); checked per call (``passes.check_values``)."""
    checks: dict = {}
    values = {v for v, _ in analysis.values}
    for node in analysis.trunk:
        verdict = analysis.verdicts[node]
        if not isinstance(verdict, ops.Local) or node.target is statistics.normalize:
            continue
        for inp in node.all_input_nodes:
            if inp in values:
                layout = verdict.layout
                dims = tuple(d for d, axis in enumerate(layout) if axis is not None)
                checks.setdefault(inp.name, []).append((len(layout), dims, node.name))
    return {name: tuple(found) for name, found in checks.items()}


def _emit_window(graph: fx.Graph, node: fx.Node, verdict: ops.Window, win, lookup, geometry, geo) -> fx.Node:
    """The node computed from its window, as its kind emits it (see ``fxstream.ops.windows``)."""
    slot = slot_getter(graph, geometry, geo, node, verdict.input.name)
    emit = Emit(graph, node, win, verdict.params, lambda v: _value(graph, v, lookup), slot, geo.ndim, HELPERS)
    return WINDOWS[verdict.kind].emit(emit)


def _value(graph: fx.Graph, value: Any, lookup) -> Any:
    """A conv weight/bias or a statistic grid: a module attribute path, a traced node, or a literal."""
    if isinstance(value, str):
        return graph.get_attr(value)
    if isinstance(value, fx.Node):
        return lookup(value)
    return value


def outer_graph(analysis: Analysis) -> fx.Graph:
    """The model with its trunk replaced by one ``fxstream_trunk`` call, made where the
    first trunk output was (with several outputs, the head reads item ``i`` of its tuple)."""
    graph = fx.Graph()
    env: dict = {}
    head = head_nodes(analysis)
    outputs = analysis.outputs
    for node in analysis.gm.graph.nodes:
        if node is outputs[0]:
            trunk = graph.call_module("fxstream_trunk", (env[analysis.image],))
            for i, output in enumerate(outputs):
                env[output] = trunk if len(outputs) == 1 else graph.call_function(operator.getitem, (trunk, i))
        elif node in head:
            env[node] = graph.node_copy(node, lambda n: env[n])
    _restore_output_type(graph, analysis.gm.meta.get("fxstream_output_type"))
    graph.lint()
    return graph


def _restore_output_type(graph: fx.Graph, output_type) -> None:
    """torch.fx returns a traced ``OrderedDict`` as a plain dict: rebuild it as the model does."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if output_type is None or not isinstance(value, dict):
        return
    with graph.inserting_before(output):
        rebuilt = graph.call_function(output_type, (tuple(value.items()),))
    output.args = (rebuilt,)


def graph_module(root: nn.Module, graph: fx.Graph, name: str, extra: dict | None = None) -> fx.GraphModule:
    """A GraphModule over a copy of ``graph`` that refers to ``root``'s current members."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(graph, {}))
    attrs = dict(extra or {})
    for node in copy.nodes:
        if node.op in ("get_attr", "call_module") and node.target not in attrs:
            attrs[node.target] = _fetch(root, node.target)
    gm = fx.GraphModule(attrs, copy, name)
    _quiet(gm)
    return gm


class _QuietCall:
    """A GraphModule call without torch.fx's error printer: its ``_WrappedCall`` prints the
    generated code around a failing line to stderr (about 25 lines per failing tile) and
    re-raises the error without its traceback. Here the error keeps its traceback, whose
    frames show the generated line, and nothing is printed."""

    def __init__(self, wrapped):
        self.cls, self.cls_call = wrapped.cls, wrapped.cls_call

    def __call__(self, obj, *args, **kwargs):
        if self.cls_call is not None:
            return self.cls_call(obj, *args, **kwargs)
        return super(self.cls, obj).__call__(*args, **kwargs)


def _quiet(gm: fx.GraphModule) -> None:
    """Install :class:`_QuietCall` on ``gm``'s own class (torch.fx makes one per instance and
    keeps its ``_wrapped_call`` across ``recompile``); left as is if torch.fx changed it."""
    wrapped = vars(type(gm)).get("_wrapped_call")
    if hasattr(wrapped, "cls") and hasattr(wrapped, "cls_call"):
        type(gm)._wrapped_call = _QuietCall(wrapped)


def _fetch(root: nn.Module, target: str) -> Any:
    """``root.<target>``, reading registered members first so that attributes of a
    wrapper class never shadow the model's own submodules."""
    obj: Any = root
    for atom in target.split("."):
        members = {}
        if isinstance(obj, nn.Module):
            members = {**obj._modules, **obj._parameters, **obj._buffers}
        obj = members[atom] if atom in members else getattr(obj, atom)
    return obj


class StreamedTrunk(nn.Module):
    """Runs the tile GraphModule over the tiles of each input under a :class:`Schedule`
    (see :class:`fxstream.runtime.executor.StreamFunction`).

    ``settings`` (:class:`StreamSettings`, shared by all programs of one
    StreamedModule) holds the input transform, the output device, the progress flag,
    the statistics and the whole-batch interception hook used by ``serial_backward``.
    Training-mode dropout and stochastic depth in the tile code are replaced by
    position-keyed draws (see ``fxstream.runtime.rng``). The tilings of the most recent input
    sizes are cached (at most ``CACHE_SIZE``)."""

    CACHE_SIZE = 8

    def __init__(
        self,
        tile: fx.GraphModule,
        geometry: TrunkGeometry,
        plan: Plan,
        settings=None,
        schedule=None,
        passes: tuple = (),
        driver: fx.GraphModule | None = None,
        checks: dict | None = None,
        pass_values: dict | None = None,
    ):
        super().__init__()
        self.tile = tile  # the output pass's tile code
        # global statistics: the tile code of each statistics pass, and the driver that runs them
        self.pass_tiles = nn.ModuleList(passes)
        self.driver = driver
        self.value_checks = checks or {}  # value -> where it must have size 1 (codegen.value_checks)
        self.pass_values = pass_values or {}  # level (None: the output pass) -> the values it reads
        self.geometry = geometry
        self.plan = plan
        self.schedule = as_schedule(schedule)
        self.settings = settings if settings is not None else StreamSettings()
        self.input_dims = geometry.axis_dims(geometry.image)
        self.outputs_dims = tuple(geometry.axis_dims(o) for o in geometry.outputs)
        self.node_dims = {name: dims for name, dims in geometry.dims}
        self.random_ops = rng.rewrite_random(tile, geometry)
        # a statistics pass's keyed draws are a subset of the output pass's (the call's draws serve all)
        self._keyed = {id(m): bool(rng.rewrite_random(m, geometry).keyed) for m in self.pass_tiles}
        self._shape_plans: OrderedDict = OrderedDict()
        self._stripes: OrderedDict = OrderedDict()

    @property
    def stats(self):
        return self.settings.stats

    @property
    def output_device(self) -> torch.device | None:
        return self.settings.output_device

    @property
    def tile_group(self):
        """The :class:`fxstream.distributed.TileGroup` splitting the tiles, or None."""
        return self.settings.tile_group

    def shape_plan(self, size: tuple[int, ...]) -> ShapePlan:
        """The tiling of an input of spatial ``size`` (with a tile group: split into its bands)."""
        group = self.tile_group
        if group is None:
            return _cached(self._shape_plans, size, lambda: plan_shape(self.geometry, self.plan, size, self.schedule))
        plan_of = lambda s, schedule: plan_shape(self.geometry, self.plan, s, schedule)  # noqa: E731
        return _cached(self._shape_plans, (size, group.size), lambda: group.shape_plan(plan_of, self.schedule, size))

    def positions(self, shape_plan: ShapePlan) -> range:
        """The raster positions of the tiles this process runs (with a tile group: its band)."""
        group = self.tile_group
        return range(shape_plan.num_tiles) if group is None else group.positions(shape_plan)

    def stripes(self, shape_plan: ShapePlan) -> Stripes | None:
        """The stripe bookkeeping of a carry tiling (None under recompute)."""
        if not shape_plan.schedule.carries:
            return None
        return _cached(self._stripes, (shape_plan.input_size, shape_plan.schedule), lambda: Stripes.of(shape_plan))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: a tensor, or an array-like (``fxstream.io.arrays``) read tile by tile."""
        if not arrays.is_image(x) or len(x.shape) != self.geometry.ndim + 2:
            shape = tuple(x.shape) if arrays.is_image(x) else type(x).__name__
            raise InputShapeError(
                f"fxstream compiled this model for (N, C, *spatial) inputs with {self.geometry.ndim} spatial "
                f"dims, got {shape}"
            )
        channels.check(x.shape[1], self.tile, self.settings.input_transform, x.dtype)
        if self.settings.intercept is not None:
            return self.settings.intercept(self, x)
        return self.stream(x)

    def stream(self, x: torch.Tensor) -> torch.Tensor:
        """The streamed trunk output for ``x`` (a differentiable autograd.Function). With global
        statistics the generated driver runs the passes (``runtime.passes``)."""
        if self.driver is not None:
            return self.driver(passes.CallState(self, x))
        size = tuple(x.shape[d] for d in self.input_dims)
        if self.tile_group is not None:  # before any other collective: every rank has the same image
            self.tile_group.check_shape(tuple(x.shape), self.compute_device(x), transfer.fingerprint(x))
        params = [p for p in self.tile.parameters() if p.requires_grad]
        if not torch.is_grad_enabled():  # inference: nothing to differentiate (and no graph to keep)
            x, params = (x.detach() if isinstance(x, torch.Tensor) else x), []
        x = x if isinstance(x, torch.Tensor) else transfer.as_source(x)  # one source: backward checks its reads
        threads.check(self.compute_device(x))  # more CPU threads than free cores: warn once
        return StreamFunction.apply(x, self, self.shape_plan(size), *params)

    def compute_device(self, x: torch.Tensor) -> torch.device:
        """Where tiles run: the device of the trunk's parameters (or of ``x`` without any)."""
        for t in itertools.chain(self.tile.parameters(), self.tile.buffers()):
            return t.device
        return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")

    def tiles(self, x, shape_plan: ShapePlan, device: torch.device, phase: str, order, skip=()):
        """``(position, tile, crop of x on device)`` for the tiles at ``order`` (crop None
        for the positions in ``skip``), with a progress bar if enabled. ``x`` is a tensor or
        an array-like (see ``fxstream.io.transfer.as_source``)."""
        order = list(order)
        tiles = shape_plan.tiles
        wanted = [tiles[p] for p in order if p not in skip]
        loaded = transfer.load_tiles(x, [tile.region for tile in wanted], self.input_dims, device)

        def merged():
            for position in order:
                if position in skip:
                    yield position, tiles[position], None
                else:
                    _, crop = next(loaded)
                    yield position, tiles[position], crop

        return progress.tiles_progress(merged(), len(order), self.settings.progress, f"fxstream {phase}")

    def prepare(self, crop: torch.Tensor) -> torch.Tensor:
        """The trunk's input for a loaded crop: the input transform applied, or a copy
        when the crop is an autograd leaf (in-place ops must not touch the leaf)."""
        transform = self.settings.input_transform
        if transform is not None:
            return transform(crop, self._floating_dtype())
        return crop.clone() if crop.requires_grad else crop

    def _floating_dtype(self) -> torch.dtype:
        for t in itertools.chain(self.tile.parameters(), self.tile.buffers()):
            if t.is_floating_point():
                return t.dtype
        return torch.get_default_dtype()

    def random_draws(self, x: torch.Tensor):
        """The random draws of one forward call on ``x`` (None when the trunk draws nothing)."""
        if not self.random_ops:
            return None
        keyed = self.random_ops.keyed
        return rng.Draws(self.random_ops, lambda sp, i: sp.origins(i, keyed), self.compute_device(x))

    @property
    def multi_output(self) -> bool:
        """Whether the trunk has several outputs (returned as a tuple, in ``geometry.outputs`` order)."""
        return len(self.geometry.outputs) > 1

    def run_tile(self, x: torch.Tensor, tile, run, random=None, module=None, values=None) -> tuple[torch.Tensor, ...]:
        """The tile's block of every trunk output (a tuple, in ``geometry.outputs`` order).
        With global statistics, ``module`` (a statistics pass's tile code; None: the output
        pass) reads the statistic ``values``; a statistics pass returns its partial sums, one
        flat tuple."""
        module = module if module is not None else self.tile
        args = (x, tile.geometry, run) + ((tuple(values or ()),) if self.driver is not None else ())
        keyed = self.random_ops.keyed if module is self.tile else self._keyed[id(module)]
        blocks = module(*args, random) if keyed else module(*args)
        if module is not self.tile:
            return tuple(t for partial in blocks for t in partial)
        blocks = blocks if self.multi_output else (blocks,)
        for block, dims, box in zip(blocks, self.outputs_dims, tile.blocks):
            check_block(block, dims, box)
        return blocks


def _cached(cache: OrderedDict, key, make):
    """``cache[key]``, made on a miss; the least recently used entry beyond
    ``StreamedTrunk.CACHE_SIZE`` is dropped."""
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    value = cache[key] = make()
    while len(cache) > StreamedTrunk.CACHE_SIZE:
        cache.popitem(last=False)
    return value
