"""Stage 3, plan: :class:`TrunkGeometry` -> :class:`Plan`.

* :class:`TrunkGeometry` (:mod:`fxstream.planning.trunk`) - the trunk as plain data: per
                           node its stencils and inputs.
* :class:`Plan`          - compile time, shape-independent, derived with sympy: cumulative
                           stride, receptive field and per-side halo of every node, and the
                           output block that fits ``tile_size``.

Both are frozen values holding ints, tuples and strings (no fx.Node, no sympy). This
module also holds the exact per-shape region walk (:func:`node_regions`), the per-axis
split of the recompute schedule (:func:`_splits`) and the tile ABI entries (:class:`Crop`,
:class:`Gather`, :class:`Resampling`); :mod:`fxstream.planning.tiling` cuts the tiles.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from typing import NamedTuple

import sympy

from ..errors import InputShapeError, PlannerError, TileSizeError, UnsupportedOpError
from ..ops import geometry as g
from . import widths
from .trunk import Pair, Step, TrunkGeometry


def aligned(bound: int, primary: int, size: int) -> int:
    """The block boundary of an output of ``size`` pixels (along one axis) aligned with the
    primary output's boundary ``bound`` of ``primary`` pixels: the same fraction of the
    image, rounded down (0 and the end map to 0 and the end)."""
    return bound * size // primary


def output_blocks(geo: TrunkGeometry, sizes: dict, axis: int, block: Pair) -> dict:
    """Blocked node (an output, or a statistic's input) -> its block along ``axis`` in the tile
    whose primary block is ``block``."""
    n = sizes[geo.output][axis]
    lo, hi = block
    return {o: g.Interval(aligned(lo, n, sizes[o][axis]), aligned(hi, n, sizes[o][axis])) for o in geo.blocked}


# Dynamic steps get their compile-time stencils from this input size (per axis): large enough
# for any downsampling, and divisible by 2**12, 3**2, 5 and 7, so that sizes divide evenly.
REFERENCE_SIZE = 2**12 * 3**2 * 5 * 7


def resolved(geo: TrunkGeometry, input_size: tuple[int, ...]) -> TrunkGeometry:
    """``geo`` with the stencils of dynamic steps evaluated for ``input_size``."""
    if not any(step.resolve for step in geo.steps):
        return geo
    _, stencils = _evaluate(geo, input_size)
    # resolved steps are plain for this size: node_sizes and the region walk need not resolve them again
    steps = tuple(
        dataclasses.replace(s, stencils=stencils[s.name], resolve=None) if s.resolve else s for s in geo.steps
    )
    return dataclasses.replace(geo, steps=steps)


# --- Compile-time plan (sympy) ---------------------------------------------------------


@dataclass(frozen=True)
class NodePlan:
    name: str
    op: str
    module_path: str
    kernel: tuple[int, ...] | None  # window extent per axis (dilation included)
    op_stride: tuple[int | float, ...] | None  # < 1 for upsampling ops
    padding: tuple[Pair, ...] | None
    stride: tuple[int | float, ...]  # cumulative, image pixels per pixel of this node (0.5 after a 2x upsampling)
    receptive_field: tuple[int, ...]  # exact, or an upper bound once the path upsamples
    halo: tuple[Pair, ...]  # (left, right) image pixels beyond the node's own footprint
    level: int = 0  # its depth: the highest level of global statistics it depends on


@dataclass(frozen=True)
class Plan:
    """The shape-independent streaming plan. ``str(plan)`` prints a table."""

    ndim: int
    tile_size: tuple[int, ...]
    block: tuple[int, ...]  # trunk-output pixels per tile, per axis
    stride: tuple[int | float, ...]
    receptive_field: tuple[int, ...]
    halo: tuple[Pair, ...]
    boundary: str
    nodes: tuple[NodePlan, ...]
    # False once the trunk upsamples (or has size-dependent windows): receptive field, halo and
    # block then come from affine bounds; the tiles of each input size fit their exact regions.
    exact: bool = True
    outputs: tuple[str, ...] = ()  # every trunk output (``boundary`` is the primary one, the last)
    # global statistics (issue 20): (name, op, level, category, input) each, and per level the
    # nodes of its pass (``TrunkGeometry.passes``)
    statistics: tuple[tuple[str, str, int, str, str], ...] = ()
    passes: tuple[tuple[str, ...], ...] = ()

    @property
    def levels(self) -> int:
        """The highest level of a global statistic (0: none): the trunk runs ``levels + 1``
        streamed passes forward and as many backward."""
        return max((s[2] for s in self.statistics), default=0)

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
        ]
        if len(self.outputs) > 1:
            strides = {n.name: n.stride for n in self.nodes}
            listed = ", ".join(f"{o} (stride {_fmt(strides[o])})" for o in self.outputs)
            lines.append(f"trunk outputs ({len(self.outputs)}, each assembled whole): {listed}")
        lines += [
            f"tile size: {_fmt(self.tile_size)}  ->  output block per tile: {_fmt(self.block)}",
            f"receptive field: {_fmt(self.receptive_field)}, stride: {_fmt(self.stride)}, "
            f"halo (left,right): {self.halo}",
        ]
        if self.statistics:
            lines.append(
                f"global statistics: {len(self.statistics)} in {self.levels} levels, {self.levels + 1} streamed passes "
                "forward and backward (`fxstream plan` shows their cost)"
            )
        if not self.exact:
            lines.append(
                "(the trunk upsamples: receptive field, halo and block are upper bounds; each input size "
                "gets the fewest tiles whose exact regions fit tile_size)"
            )
        return "\n".join(lines)


def _fmt(values: tuple) -> str:
    return "x".join(str(v) for v in values)


def tile_tuple(tile_size: int | tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """``tile_size`` (an int, or one int per spatial axis) as one int per axis."""
    sizes = (tile_size,) * ndim if isinstance(tile_size, int) else tuple(tile_size)
    if len(sizes) != ndim:
        raise TileSizeError(f"tile_size={tile_size} has {len(sizes)} entries, the trunk has {ndim} spatial dims")
    return sizes


def build_plan(geo: TrunkGeometry, tile_size: tuple[int, ...], carries: bool = False) -> Plan:
    """The shape-independent plan. ``carries``: under the carry schedule a tile may be smaller
    than the receptive field (each input size's tiling checks what its first tile needs)."""
    dynamic = any(step.resolve for step in geo.steps)
    geo = resolved(geo, (REFERENCE_SIZE,) * geo.ndim)
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
    exact = not dynamic and all(isinstance(op, g.Stencil) for step in geo.steps for op in step.stencils or ())
    if not exact or carries:  # bounds only: each input size finds its real blocks (tiling), or raises there
        block = tuple(max(b, 1) for b in block)
    if min(block) < 1:
        raise TileSizeError(
            f"tile_size={_fmt(tile_size)} is too small: the trunk (up to '{geo.output}') has a receptive field "
            f"of {_fmt(receptive_field)} pixels, so one tile must be at least tile_size={_fmt(receptive_field)} "
            f"to produce one output pixel. Use a tile several times larger (e.g. "
            f"{_fmt(tuple(4 * r for r in receptive_field))}) to keep the halo overhead small.",
            minimum=receptive_field,
        )
    statistics = tuple((st.name, st.op, st.level, st.category, st.input) for st in geo.statistics)
    return Plan(
        geo.ndim,
        tile_size,
        block,
        stride,
        receptive_field,
        halo,
        geo.output,
        tuple(nodes),
        exact,
        geo.outputs,
        statistics,
        geo.passes,
    )


def _check_same_stride(step: Step, inputs: list) -> None:
    """A merge of branches with different cumulative strides is not translation
    equivariant (the shapes only agree at some image sizes): it cannot be tiled."""
    strides = {sympy.simplify(m.stride) for m in inputs}
    if len(strides) > 1 or any(s.free_symbols for s in strides):
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
    described = [_describe(s) for s in step.stencils] if step.stencils else None
    return NodePlan(
        step.name,
        step.op,
        step.module_path,
        tuple(d[0] for d in described) if described else None,
        tuple(d[1] for d in described) if described else None,
        tuple(d[2] for d in described) if described else None,
        tuple(g.as_number(a.stride, f"stride of {step.name}") for a in axes),
        tuple(g.ceil_int(a.receptive_field, f"receptive field of {step.name}") for a in axes),
        tuple(tuple(g.ceil_int(h, f"halo of {step.name}") for h in a.halo) for a in axes),
        step.depth,
    )


def _describe(op) -> tuple:
    """(kernel extent, op stride, (pad left, pad right)) of one axis op, for the table."""
    if isinstance(op, g.Stencil):
        return op.extent, op.stride, (op.pad_lo, op.pad_hi)
    if isinstance(op, g.Transposed):
        return op.extent, 1 / op.stride, (op.pad, op.pad)
    if isinstance(op, g.Shuffle):
        return 1, 1 / op.factor, (0, 0)
    return 1, g.as_number(1 / op.ratio, "resampling stride"), (0, 0)


# --- Per-shape tiling (ints) -------------------------------------------------------------


def node_sizes(geo: TrunkGeometry, input_size: tuple[int, ...]) -> dict:
    return _evaluate(geo, input_size)[0]


def _evaluate(geo: TrunkGeometry, input_size: tuple[int, ...]) -> tuple[dict, dict]:
    """Spatial size of every node, and the stencils of every step, for ``input_size``."""
    sizes = {geo.image: tuple(input_size)}
    stencils: dict = {}
    values: dict = {}
    pending = list(geo.size_nodes)
    for index, step in enumerate(geo.steps):
        while pending and pending[0].before <= index:
            size_node = pending.pop(0)
            values[size_node.name] = size_node.evaluate(values, sizes)
        stencils[step.name] = step.resolve(values, sizes) if step.resolve else step.stencils
        ins = {sizes[p] for p in step.inputs}
        if len(ins) > 1:
            raise InputShapeError(
                f"the inputs of '{step.name}' ({step.op}, module '{step.module_path}') have different spatial "
                f"sizes {sorted(ins)} for an input of size {input_size}; the model itself cannot run on it"
            )
        (size,) = ins
        if stencils[step.name]:
            size = tuple(s.out_size(n) for s, n in zip(stencils[step.name], size))
        if min(size) < 1:
            raise InputShapeError(
                f"an input of spatial size {input_size} is too small: '{step.name}' ({step.op}, module "
                f"'{step.module_path}') would have size {size}"
            )
        sizes[step.name] = size
    for size_node in pending:  # after the last step: size guards of the head (fxstream.frontend.tracecheck.size_guard)
        values[size_node.name] = size_node.evaluate(values, sizes)
    return sizes, stencils


def _splits(geo: TrunkGeometry, plan: Plan, sizes: dict) -> list[list[g.Interval]]:
    """Per axis, the trunk-output blocks of the tiles (``geo`` resolved for these sizes):
    the fewest blocks whose exact input regions fit ``tile_size`` (:func:`fitted_split`)."""
    splits = []
    for axis, (n, limit) in enumerate(zip(sizes[geo.output], plan.tile_size)):
        split = fitted_split(widths.recompute_width(_axis_width(geo, sizes, axis), geo, sizes, axis), n, limit)
        if split is None:
            raise TileSizeError(
                f"tile_size={_fmt(plan.tile_size)} is too small for an input of size {_fmt(sizes[geo.image])}: "
                f"one output pixel of '{geo.output}'{_with_others(geo)} reads more than {limit} pixels along "
                f"spatial axis {axis}. The plan's receptive field is {_fmt(plan.receptive_field)}.",
                minimum=plan.receptive_field,
            )
        splits.append(split)
    return splits


def _with_others(geo: TrunkGeometry) -> str:
    """For error messages: the other outputs' blocks that a tile computes too."""
    others = len(geo.outputs) - 1
    return f" (with the aligned blocks of the {others} other trunk outputs)" if others else ""


def _axis_width(geo: TrunkGeometry, sizes: dict, axis: int):
    """``width(lo, hi)``: the extent along ``axis`` of the image region that the trunk-output
    block ``[lo, hi)`` reads (every op acts on each axis separately, so the other axes do not
    matter: one pixel there)."""
    ndim = len(sizes[geo.output])

    def width(lo: int, hi: int) -> int:
        corner = tuple((lo, hi) if a == axis else (0, 1) for a in range(ndim))
        region = _regions(geo, sizes, corner)[0][geo.image][axis]
        return region.hi - region.lo

    return width


def fitted_split(width, n: int, limit: int) -> list[g.Interval] | None:
    """Cut ``[0, n)`` into the fewest blocks whose regions (``width``) fit ``limit``, then even
    them out: among splits with that many blocks, the one with the smallest largest region.

    Tiles at the image border read less than interior ones (their halo is clipped), so they
    get larger blocks, and an image that fits in one tile is one tile. None if a one-pixel
    block does not fit. Memoised by ``width.key`` where it has one (:func:`widths.cached_split`)."""
    return widths.cached_split(width, n, limit, lambda: _fitted_split(width, n, limit))


def _fitted_split(width, n: int, limit: int) -> list[g.Interval] | None:
    parts = _greedy_split(width, n, limit)
    if parts is None:
        return None
    lo, hi = 1, limit  # the smallest limit that still needs no more blocks
    while lo < hi:
        mid = (lo + hi) // 2
        trial = _greedy_split(width, n, mid, most=len(parts))
        if trial is not None and len(trial) <= len(parts):
            hi = mid
        else:
            lo = mid + 1
    return _greedy_split(width, n, lo)


def _greedy_split(width, n: int, limit: int, most: int | None = None) -> list[g.Interval] | None:
    """Left to right, each block as long as its region fits ``limit`` (the fewest blocks,
    as regions grow with their blocks); None if a one-pixel block does not fit. With
    ``most``, it stops after ``most + 1`` blocks (the caller only asks whether it needs more)."""
    parts, start = [], 0
    while start < n and (most is None or len(parts) <= most):
        if width(start, start + 1) > limit:
            return None
        lo, hi = 1, n - start
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if width(start, start + mid) <= limit else (lo, mid - 1)
        parts.append(g.Interval(start, start + lo))
        start += lo
    return parts


def plan_splits(plan: Plan, out_size: tuple[int, ...]) -> list[list[g.Interval]]:
    """The plan's uniform split (blocks of at most ``plan.block``), without the per-input
    refinements of :func:`_splits`. Tests use it to force many tiles on small images."""
    return [balanced_split(n, b) for n, b in zip(out_size, plan.block)]


def _regions(geo: TrunkGeometry, sizes: dict, block: tuple) -> tuple[dict, dict]:
    """Walk the trunk backwards from the primary output's ``block`` (per axis ``(lo, hi)``)
    and the other outputs' aligned blocks: the region every node computes, and for every
    edge the raw interval its consumer reads (padding included; ``("", output)``: the block)."""
    per_axis = [output_blocks(geo, sizes, axis, b) for axis, b in enumerate(block)]
    blocks = {o: [axis[o] for axis in per_axis] for o in geo.blocked}
    need: dict = dict(blocks)
    raw: dict = {("", o): blocks[o] for o in geo.outputs}
    for step in reversed(geo.steps):
        region = need.get(step.name)
        if region is None:
            continue  # not needed by this tile (cannot happen for a pruned trunk)
        region = need[step.name] = [_non_empty(r, n) for r, n in zip(region, sizes[step.name])]
        for producer in step.inputs:
            if step.stencils:
                edge = [s.read(r, n) for s, r, n in zip(step.stencils, region, sizes[producer])]
            else:
                edge = region
            raw[(step.name, producer)] = edge
            src = [g.source_interval(e, n, step.fill) for e, n in zip(edge, sizes[producer])]
            old = need.get(producer)
            need[producer] = [_hull(s, o) for s, o in zip(src, old)] if old else src
    need[geo.image] = [_non_empty(r, n) for r, n in zip(need[geo.image], sizes[geo.image])]
    return need, raw


def balanced_split(n: int, block: int) -> list[g.Interval]:
    """Cut ``[0, n)`` into the fewest blocks of at most ``block``, of near-equal sizes: the
    same number of tiles as ``block``-sized ones with a ragged last, but a smaller largest
    tile (less peak memory) and fewer distinct tile shapes."""
    count = -(-n // block)
    base, extra = divmod(n, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return [g.Interval(lo, hi) for lo, hi in zip(bounds, bounds[1:])]


def _resample_entry(op: g.Resample, region: g.Interval, raw: g.Interval, size: int, dim: int) -> Resampling:
    """The taps of the outputs in ``region``, indexed from the window's start ``raw.lo``."""
    index, weight = g.resample_taps(op, size)
    taps = len(index[0])
    rows = range(region.lo, region.hi)
    idx = tuple(tuple(index[i][k] - raw.lo for i in rows) for k in range(taps))
    wts = None if weight is None else tuple(tuple(weight[i][k] for i in rows) for k in range(taps))
    return Resampling(dim, idx, wts)


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


class Resampling(NamedTuple):
    """Along ``dim``, output ``i`` is ``sum_k weight[k][i] * x[index[k][i]]`` (one tap of
    weight 1 when ``weight`` is None); indices are relative to the window."""

    dim: int
    index: tuple
    weight: tuple | None


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
    return node_regions(geo, input_size, block)[geo.image]


def node_regions(geo: TrunkGeometry, input_size: tuple[int, ...], block: tuple[Pair, ...]) -> dict:
    """Node name (the image included) -> the region, per axis ``(lo, hi)``, that the
    trunk-output ``block`` makes it compute (read-only; used by the memory model)."""
    return node_windows(geo, input_size, block)[0]


def node_windows(geo: TrunkGeometry, input_size: tuple[int, ...], block: tuple[Pair, ...]) -> tuple[dict, dict]:
    """:func:`node_regions`, and ``(consumer, producer)`` -> the raw interval per axis that
    the consumer reads of its producer, padding included (it leaves ``[0, size)`` where
    the window is padded at the image border)."""
    geo = resolved(geo, tuple(input_size))
    sizes = node_sizes(geo, tuple(input_size))
    need, raw = _regions(geo, sizes, tuple(block))
    pairs = lambda intervals: tuple((int(r.lo), int(r.hi)) for r in intervals)  # noqa: E731
    return {name: pairs(region) for name, region in need.items()}, {k: pairs(v) for k, v in raw.items() if k[0]}
