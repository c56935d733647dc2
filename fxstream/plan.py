"""Stage 3, plan: :class:`Analysis` -> :class:`TrunkGeometry` -> :class:`Plan` -> :class:`ShapePlan`.

* :class:`TrunkGeometry` - the trunk as plain data: per node its stencils and inputs.
* :class:`Plan`          - compile time, shape-independent, derived with sympy: cumulative
                           stride, receptive field and per-side halo of every node, and the
                           output block that fits ``tile_size``.
* :class:`ShapePlan`     - for one input size, in ints: the tile grid and, for every tile,
                           the exact region each node computes and the crop/pad of each edge.

All three are frozen values holding ints, tuples and strings (no fx.Node, no sympy).
"""

from __future__ import annotations

import functools
import itertools
import json
import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import sympy

from . import geometry as g
from . import ops
from .analyze import Analysis
from .errors import InputShapeError, PlannerError, TileSizeError, UnsupportedOpError
from .trace import module_path, source_line

Pair = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """One trunk node. ``kind`` is 'local' or a window kind ('conv', 'max_pool', 'avg_pool', 'pad')."""

    name: str
    kind: str
    op: str
    module_path: str
    inputs: tuple[str, ...]
    stencils: tuple[g.Stencil, ...] | None = None
    fill: str = "constant"
    include_pad: bool = True
    divisor: int | None = None
    source: str = ""  # the user's source line, for error messages

    @property
    def needs_counts(self) -> bool:
        return self.kind == "avg_pool" and self.divisor is None


@dataclass(frozen=True)
class Slot:
    """One entry of a tile's geometry tuple: the crop/pad of an edge ('window'),
    or the divisors of an average pooling ('counts'). ``consumer`` is '' for the
    final crop of the trunk output."""

    kind: str
    consumer: str
    producer: str


@dataclass(frozen=True)
class TrunkGeometry:
    ndim: int
    image: str
    output: str
    steps: tuple[Step, ...]
    dims: tuple[tuple[str, tuple[int, ...]], ...]  # node -> tensor dim of each spatial axis
    slots: tuple[Slot, ...]

    @functools.cached_property
    def steps_by_name(self) -> dict:
        return {step.name: step for step in self.steps}

    @functools.cached_property
    def _dims(self) -> dict:
        return dict(self.dims)

    def slot(self, kind: str, consumer: str, producer: str) -> int:
        return self.slots.index(Slot(kind, consumer, producer))

    def axis_dims(self, name: str) -> tuple[int, ...]:
        return self._dims[name]


def build_geometry(analysis: Analysis) -> TrunkGeometry:
    steps, slots = [], []
    for node in analysis.trunk:
        verdict = analysis.verdicts[node]
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes if n in analysis.layouts))
        step = Step(node.name, "local", _op_name(analysis, node), module_path(node), inputs, source=source_line(node))
        if isinstance(verdict, ops.Window):
            step = Step(
                node.name,
                verdict.kind,
                step.op,
                step.module_path,
                (verdict.input.name,),
                verdict.stencils,
                verdict.fill,
                verdict.params.get("include_pad", True),
                verdict.params.get("divisor"),
                step.source,
            )
        steps.append(step)
        slots += [Slot("window", node.name, producer) for producer in step.inputs]
        if step.needs_counts:
            slots.append(Slot("counts", node.name, step.inputs[0]))
    slots.append(Slot("window", "", analysis.output.name))
    nodes = [analysis.image] + analysis.trunk
    dims = tuple((n.name, tuple(analysis.layouts[n].index(a) for a in range(analysis.ndim))) for n in nodes)
    return TrunkGeometry(analysis.ndim, analysis.image.name, analysis.output.name, tuple(steps), dims, tuple(slots))


def _op_name(analysis: Analysis, node) -> str:
    if node.op == "call_module":
        return type(analysis.gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}"
    return getattr(node.target, "__name__", str(node.target))


# --- Compile-time plan (sympy) ---------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    name: str
    op: str
    module_path: str
    kernel: tuple[int, ...] | None  # window extent per axis (dilation included)
    op_stride: tuple[int, ...] | None
    padding: tuple[Pair, ...] | None
    stride: tuple[int, ...]  # cumulative, image pixels per pixel of this node
    receptive_field: tuple[int, ...]
    halo: tuple[Pair, ...]  # (left, right) image pixels beyond the node's own footprint


@dataclass(frozen=True)
class Plan:
    """The shape-independent streaming plan. ``str(plan)`` prints a table."""

    ndim: int
    tile_size: tuple[int, ...]
    block: tuple[int, ...]  # trunk-output pixels per tile, per axis
    stride: tuple[int, ...]
    receptive_field: tuple[int, ...]
    halo: tuple[Pair, ...]
    boundary: str
    nodes: tuple[NodePlan, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        header = f"{'node':<28} {'op':<18} {'module':<24} {'stride':>8} {'rf':>9} {'halo (l,r)':>16}"
        lines = [header, "-" * len(header)]
        for n in self.nodes:
            halo = " ".join(f"{lo},{hi}" for lo, hi in n.halo)
            lines.append(
                f"{n.name[:28]:<28} {n.op[:18]:<18} {n.module_path[:24]:<24} {_fmt(n.stride):>8} "
                f"{_fmt(n.receptive_field):>9} {halo:>16}"
            )
        lines += [
            "",
            f"boundary (trunk output): {self.boundary}",
            f"tile size: {_fmt(self.tile_size)}  ->  output block per tile: {_fmt(self.block)}",
            f"receptive field: {_fmt(self.receptive_field)}, stride: {_fmt(self.stride)}, "
            f"halo (left,right): {self.halo}",
        ]
        return "\n".join(lines)


def _fmt(values: tuple) -> str:
    return "x".join(str(v) for v in values)


def build_plan(geo: TrunkGeometry, tile_size: tuple[int, ...]) -> Plan:
    maps = {geo.image: [g.AxisMap.identity()] * geo.ndim}
    nodes = []
    for step in geo.steps:
        axes = []
        for axis in range(geo.ndim):
            stencil = step.stencils[axis] if step.stencils else g.IDENTITY
            inputs = [maps[producer][axis].through(stencil) for producer in step.inputs]
            _check_same_stride(step, inputs)
            combined = None
            for one in inputs:
                combined = one.hull(combined)
            axes.append(combined)
        maps[step.name] = axes
        nodes.append(_node_plan(step, axes))
    out = maps[geo.output]
    receptive_field = next(n.receptive_field for n in nodes if n.name == geo.output)
    stride = next(n.stride for n in nodes if n.name == geo.output)
    halo = next(n.halo for n in nodes if n.name == geo.output)
    block = tuple(g.block_for_tile(axis, t) for axis, t in zip(out, tile_size))
    if min(block) < 1:
        raise TileSizeError(
            f"tile_size={_fmt(tile_size)} is too small: the trunk (up to '{geo.output}') has a receptive field "
            f"of {_fmt(receptive_field)} pixels, so one tile must be at least tile_size={_fmt(receptive_field)} "
            f"to produce one output pixel. Use a tile several times larger (e.g. "
            f"{_fmt(tuple(4 * r for r in receptive_field))}) to keep the halo overhead small.",
            minimum=receptive_field,
        )
    return Plan(geo.ndim, tile_size, block, stride, receptive_field, halo, geo.output, tuple(nodes))


def _check_same_stride(step: Step, inputs: list) -> None:
    """A merge of branches with different cumulative strides is not translation
    equivariant (the shapes only agree at some image sizes): it cannot be tiled."""
    strides = {sympy.simplify(m.stride) for m in inputs}
    if len(strides) > 1 or any(s.free_symbols or not s.is_integer for s in strides):
        where = f"\n  at {step.source}" if step.source else ""
        raise UnsupportedOpError(
            f"cannot stream {step.op}: it merges inputs with different cumulative strides "
            f"({', '.join(sorted(map(str, strides)))} image pixels per pixel), so its inputs only line up at some "
            f"image sizes and no tiling is exact.\n  node '{step.name}' in module '{step.module_path}'{where}\n"
            "  fix: make the branches downsample alike, or pass boundary=... to stream only the part before it",
            node=step.name,
            module_path=step.module_path,
            op=step.op,
        )


def _node_plan(step: Step, axes: list) -> NodePlan:
    stencils = step.stencils
    return NodePlan(
        step.name,
        step.op,
        step.module_path,
        tuple(s.extent for s in stencils) if stencils else None,
        tuple(s.stride for s in stencils) if stencils else None,
        tuple((s.pad_lo, s.pad_hi) for s in stencils) if stencils else None,
        tuple(g.as_int(a.stride, f"stride of {step.name}") for a in axes),
        tuple(g.as_int(a.receptive_field, f"receptive field of {step.name}") for a in axes),
        tuple(tuple(g.as_int(h, f"halo of {step.name}") for h in a.halo) for a in axes),
    )


# --- Per-shape tiling (ints) -------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    block: tuple[Pair, ...]  # trunk-output block per axis, [lo, hi)
    region: tuple[Pair, ...]  # image region read, per axis
    geometry: tuple  # one entry per TrunkGeometry.slots


@dataclass(frozen=True)
class ShapePlan:
    input_size: tuple[int, ...]
    output_size: tuple[int, ...]
    grid: tuple[int, ...]  # tiles per axis
    tiles: tuple[Tile, ...]
    computed: int  # pixels computed over all tiles and nodes
    whole: int  # pixels of one whole-image pass over all nodes

    @property
    def halo_overhead(self) -> float:
        """h: work computed over all tiles divided by one whole-image pass."""
        return self.computed / self.whole


def node_sizes(geo: TrunkGeometry, input_size: tuple[int, ...]) -> dict:
    sizes = {geo.image: tuple(input_size)}
    for step in geo.steps:
        ins = {sizes[p] for p in step.inputs}
        if len(ins) > 1:
            raise InputShapeError(
                f"the inputs of '{step.name}' ({step.op}, module '{step.module_path}') have different spatial "
                f"sizes {sorted(ins)} for an input of size {input_size}; the model itself cannot run on it"
            )
        (size,) = ins
        if step.stencils:
            size = tuple(s.out_size(n) for s, n in zip(step.stencils, size))
        if min(size) < 1:
            raise InputShapeError(
                f"an input of spatial size {input_size} is too small: '{step.name}' ({step.op}, module "
                f"'{step.module_path}') would have size {size}"
            )
        sizes[step.name] = size
    return sizes


def plan_shape(geo: TrunkGeometry, plan: Plan, input_size: tuple[int, ...]) -> ShapePlan:
    sizes = node_sizes(geo, input_size)
    out_size = sizes[geo.output]
    starts = [range(0, n, b) for n, b in zip(out_size, plan.block)]
    tiles = []
    computed = 0
    for corner in itertools.product(*starts):
        block = tuple(g.Interval(lo, min(lo + b, n)) for lo, b, n in zip(corner, plan.block, out_size))
        tile, work = _tile(geo, sizes, block)
        tiles.append(tile)
        computed += work
    whole = sum(math.prod(sizes[s.name]) for s in geo.steps)
    grid = tuple(len(s) for s in starts)
    return ShapePlan(tuple(input_size), out_size, grid, tuple(tiles), computed, whole)


def _tile(geo: TrunkGeometry, sizes: dict, block: tuple) -> tuple[Tile, int]:
    """Walk the trunk backwards from the output block: the region every node computes,
    and for every edge the raw interval its consumer reads (padding included)."""
    need: dict = {geo.output: list(block)}
    raw: dict = {}
    for step in reversed(geo.steps):
        region = need.get(step.name)
        if region is None:
            continue  # not needed by this tile (cannot happen for a pruned trunk)
        region = need[step.name] = [_non_empty(r, n) for r, n in zip(region, sizes[step.name])]
        for producer in step.inputs:
            edge = [s.need(r) for s, r in zip(step.stencils, region)] if step.stencils else region
            raw[(step.name, producer)] = edge
            src = [g.source_interval(e, n, step.fill) for e, n in zip(edge, sizes[producer])]
            old = need.get(producer)
            need[producer] = [_hull(s, o) for s, o in zip(src, old)] if old else src
    need[geo.image] = [_non_empty(r, n) for r, n in zip(need[geo.image], sizes[geo.image])]
    raw[("", geo.output)] = list(block)
    steps = geo.steps_by_name
    entries = []
    for slot in geo.slots:
        if slot.kind == "counts":
            step = steps[slot.consumer]
            entries.append(
                tuple(
                    s.window_counts(r, n, step.include_pad)
                    for s, r, n in zip(step.stencils, need[step.name], sizes[slot.producer])
                )
            )
            continue
        fill = steps[slot.consumer].fill if slot.consumer else "constant"
        entries.append(
            _window_entry(
                raw[(slot.consumer, slot.producer)],
                need[slot.producer],
                sizes[slot.producer],
                geo.axis_dims(slot.producer),
                fill,
            )
        )
    work = sum(math.prod(r.length for r in need[s.name]) for s in geo.steps)
    as_pairs = lambda intervals: tuple((int(r.lo), int(r.hi)) for r in intervals)  # noqa: E731
    return Tile(as_pairs(block), as_pairs(need[geo.image]), tuple(entries)), work


def _hull(a: g.Interval, b: g.Interval) -> g.Interval:
    if a.is_empty():
        return b
    if b.is_empty():
        return a
    return a.hull(b)


def _non_empty(r: g.Interval, size: int) -> g.Interval:
    """A node must compute at least one pixel for the tensor to exist; when its
    consumers read only padding, compute the nearest in-image pixel."""
    if not r.is_empty():
        return r
    at = min(max(r.lo, 0), size - 1)
    return g.Interval(at, at + 1)


class Crop(NamedTuple):
    """Take ``[start, stop)`` of the producer's region along ``dim``, then pad it with the
    fill value by ``pad_lo``/``pad_hi`` where the window leaves the image."""

    dim: int
    start: int
    stop: int
    pad_lo: int
    pad_hi: int


class Gather(NamedTuple):
    """Read ``index`` (relative to the producer's region) along ``dim``: reflect and
    replicate padding where the window leaves the image."""

    dim: int
    index: tuple


def _window_entry(raw, region, size, dims, fill) -> tuple:
    """How a consumer reads its producer: per axis a :class:`Crop` or a :class:`Gather`
    whose result covers the consumer's raw interval exactly."""
    entry = []
    for r, reg, n, dim in zip(raw, region, size, dims):
        if fill != "constant" and (r.lo < 0 or r.hi > n):
            entry.append(Gather(dim, tuple(g.border_index(j, n, fill) - reg.lo for j in range(r.lo, r.hi))))
            continue
        src = g.Interval(max(r.lo, 0), min(r.hi, n))
        if src.is_empty():  # the consumer reads only border padding here
            entry.append(Crop(dim, 0, 0, r.hi - r.lo, 0))
            continue
        if not (reg.lo <= src.lo and src.hi <= reg.hi):
            raise PlannerError(f"planner: source {src} outside computed region {reg}")
        entry.append(Crop(dim, src.lo - reg.lo, src.hi - reg.lo, src.lo - r.lo, r.hi - src.hi))
    return tuple(entry)


def input_region(geo: TrunkGeometry, input_size: tuple[int, ...], block: tuple[Pair, ...]) -> tuple[Pair, ...]:
    """The image region that the trunk-output ``block`` (per axis ``(lo, hi)``) reads."""
    sizes = node_sizes(geo, tuple(input_size))
    tile, _ = _tile(geo, sizes, tuple(g.Interval(lo, hi) for lo, hi in block))
    return tile.region
