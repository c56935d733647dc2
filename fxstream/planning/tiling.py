"""Stage 4, tiling: :class:`TrunkGeometry` + :class:`Plan` + :class:`Schedule` + an input
size -> :class:`ShapePlan`, the tiles of that input in ints.

Every op acts on each spatial axis separately, so a tiling is a product of per-axis
splits, and everything about a tile along one axis depends only on its block along that
axis. This module computes, per axis and per block (:class:`AxisTile`):

* ``computed``: the interval each node computes in the tile;
* ``region``:   the interval each node offers its consumers (what their windows crop);
* ``entries``:  the tile ABI entries of every geometry slot (crop/pad, counts, trims, taps);
* ``pieces``:   under the carry schedule, how each node's region is assembled from its
                own cell and the stripes of earlier tiles' cells.

A tile is the product of one :class:`AxisTile` per axis, built on demand, so even a
1,000,000 x 1,000,000 input costs one walk per block per axis.

**Recompute schedule.** A tile computes the whole cone of its output block: ``computed ==
region`` is the exact region walk of :func:`plan._regions`.

**Carry schedule.** Every node's output is cut into *cells*, one per tile, by boundaries
``b_v[0] = 0 < b_v[1] <= ... <= b_v[K] = n_v``. The trunk output's boundaries are its blocks;
a producer's boundary ``k`` is the furthest any of its consumers reads for the consumer's
cell boundary ``k`` (``hi`` of the source interval of the read of output ``b_w[k] - 1``):

    b_v[k] = max over consumers w of  src_hi(read_w([b_w[k] - 1, b_w[k])))

so the cell ``k`` of a consumer reads nothing of its producer beyond the producer's cell
``k``: it reads its producer's own cell ``k`` and *stripes* of cells ``j < k``. In raster
order every cell whose index is ``<=`` along every axis runs earlier, so a tile can
assemble each producer's region from the stripes stored by earlier tiles and its own cell.
A boundary that would leave some node with an empty cell is dropped (its two tiles merge).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass

from ..errors import TileSizeError, user_error
from ..ops import geometry as g
from . import plan as planner
from . import widths
from .plan import (
    Crop,
    Plan,
    _fmt,
    _hull,
    _non_empty,
    _resample_entry,
    _window_entry,
    fitted_split,
    node_sizes,
    resolved,
)
from .schedule import Schedule
from .trunk import TrunkGeometry

Pair = tuple[int, int]

# The most tiles one input may be cut into. Planning costs a walk per block per axis, and the
# tile list about 36 KB and 1.7 ms per tile (ResNet-18, carry, on one core): 2**20 tiles are
# about 36 GB. Beyond it an input is refused before any walk (a 10**9 x 10**9 image at
# tile_size=512 would be 4 * 10**12 tiles).
MAX_TILES = 2**20


@dataclass(frozen=True)
class AxisTile:
    """One block along one axis, and what every node does along that axis in its tiles."""

    block: Pair  # the primary output's block
    computed: tuple[tuple[str, Pair], ...]  # node -> interval it computes (image: its crop)
    region: tuple[tuple[str, Pair], ...]  # node -> interval it offers its consumers
    entries: tuple  # one entry per TrunkGeometry.slots
    reads: tuple[tuple[tuple[str, str], Pair], ...]  # (consumer, producer) -> raw interval read (padding included)
    # carry only: node -> ((cell index j, (lo, hi)), ...) covering the region, ascending j;
    # the last segment is the node's own cell
    pieces: tuple[tuple[str, tuple[tuple[int, Pair], ...]], ...] = ()
    blocks: tuple[Pair, ...] = ()  # the block of every trunk output (TrunkGeometry.outputs)


@dataclass(frozen=True)
class Tile:
    index: tuple[int, ...]  # grid position
    block: tuple[Pair, ...]  # primary trunk-output block per axis, [lo, hi)
    region: tuple[Pair, ...]  # image region read, per axis
    geometry: tuple  # one entry per TrunkGeometry.slots
    # carry only, per carried node: (name, cell box, ((source tile position, box), ...),
    # grid of the pieces per axis); the pieces in raster order, the own cell at source -1
    carry: tuple = ()
    blocks: tuple[tuple[Pair, ...], ...] = ()  # per trunk output (TrunkGeometry.outputs), its block per axis


@dataclass(frozen=True)
class ShapePlan:
    """The tiles of one input size under one schedule. ``tiles`` is built on first use."""

    input_size: tuple[int, ...]
    output_size: tuple[int, ...]  # of the primary output
    grid: tuple[int, ...]  # tiles per axis
    schedule: Schedule
    axes: tuple[tuple[AxisTile, ...], ...]  # per axis, per block
    computed: int  # pixels computed over all tiles and nodes
    whole: int  # pixels of one whole-image pass over all nodes
    stripe_pixels: tuple[tuple[str, int], ...] = ()  # carry: node -> pixels of its stored stripes
    output_sizes: tuple[tuple[int, ...], ...] = ()  # of every trunk output (TrunkGeometry.outputs)

    @property
    def halo_overhead(self) -> float:
        """h: work computed over all tiles divided by one whole-image pass (1.0 under carry)."""
        return self.computed / self.whole

    @property
    def num_tiles(self) -> int:
        return math.prod(self.grid)

    def band_ranges(self, positions: range) -> list[range]:
        """``positions`` (contiguous whole tile rows, e.g. a rank's) cut at the band starts
        of the tiling (``Schedule.band_starts``): the raster positions of each band. No
        stripe crosses a band start."""
        row = math.prod(self.grid[1:])
        cuts = [s * row for s in self.schedule.band_starts(self.grid[0]) if positions.start < s * row < positions.stop]
        edges = [positions.start, *cuts, positions.stop]
        return [range(a, b) for a, b in zip(edges, edges[1:]) if b > a]

    @functools.cached_property
    def tiles(self) -> tuple[Tile, ...]:
        return tuple(self.tile(index) for index in itertools.product(*(range(n) for n in self.grid)))

    def tile(self, index: tuple[int, ...]) -> Tile:
        parts = [self.axes[a][k] for a, k in enumerate(index)]
        geometry = tuple(tuple(p.entries[s] for p in parts) for s in range(len(parts[0].entries)))
        image = tuple(dict(p.computed)[""] for p in parts)
        carry = self._carry(index, parts) if self.schedule.carries else ()
        blocks = tuple(tuple(p.blocks[i] for p in parts) for i in range(len(parts[0].blocks)))
        return Tile(tuple(index), tuple(p.block for p in parts), image, geometry, carry, blocks)

    def _carry(self, index: tuple[int, ...], parts: list[AxisTile]) -> tuple:
        """Per carried node: its cell box, and the pieces of its region in raster order."""
        result = []
        per_axis = [dict(p.pieces) for p in parts]
        for name in (n for n, _ in parts[0].pieces):
            segments = [axis[name] for axis in per_axis]
            cell = tuple(seg[-1][1] for seg in segments)
            pieces = []
            for combo in itertools.product(*segments):
                source = tuple(j for j, _ in combo)
                box = tuple(interval for _, interval in combo)
                pieces.append((-1 if source == index else self.linear(source), box))
            result.append((name, cell, tuple(pieces), tuple(len(s) for s in segments)))
        return tuple(result)

    def linear(self, index: tuple[int, ...]) -> int:
        """The raster position of the tile at grid ``index``."""
        position = 0
        for i, n in zip(index, self.grid):
            position = position * n + i
        return position

    def origins(self, position: int, names) -> dict:
        """Node -> global start of the interval it computes in tile ``position`` (random keys)."""
        index = []
        for n in reversed(self.grid):
            position, i = divmod(position, n)
            index.append(i)
        parts = [self.axes[a][k] for a, k in enumerate(reversed(index))]
        computed = [dict(p.computed) for p in parts]
        return {name: tuple(c[name][0] for c in computed) for name in names}


def plan_shape(geo: TrunkGeometry, plan: Plan, input_size: tuple[int, ...], schedule: Schedule) -> ShapePlan:
    """The tiles of an input of spatial size ``input_size``."""
    _check_tile_count(plan, input_size)
    geo = resolved(geo, tuple(input_size))
    sizes = node_sizes(geo, tuple(input_size))
    if schedule.carries:
        bounds = carry_bounds(geo, plan, sizes)
        starts = schedule.band_starts(len(bounds[0]) - 1)  # tile-group bands, and banded carry's
        axes = tuple(
            tuple(_carry_axis(geo, sizes, a, axis_bounds, starts if a == 0 else (0,)))
            for a, axis_bounds in enumerate(bounds)
        )
    else:
        axes = tuple(
            tuple(_recompute_axis(geo, sizes, a, (int(b.lo), int(b.hi))) for b in split)
            for a, split in enumerate(planner._splits(geo, plan, sizes))
        )
    names = [geo.image] + [s.name for s in geo.steps]
    per_axis_sums = [_sum_lengths(axis, names) for axis in axes]
    computed = sum(math.prod(sums[name] for sums in per_axis_sums) for name in names[1:])
    whole = sum(math.prod(sizes[s.name]) for s in geo.steps)
    stripes = _stripe_pixels(axes, names) if schedule.carries else ()
    grid = tuple(len(a) for a in axes)
    if schedule.bands[-1] >= grid[0]:
        raise TileSizeError(
            f"bands={schedule.bands} start beyond the {grid[0]} tile rows of an input of size {_fmt(input_size)}"
        )
    outputs = tuple(sizes[o] for o in geo.outputs)
    return ShapePlan(tuple(input_size), sizes[geo.output], grid, schedule, axes, computed, whole, stripes, outputs)


def _check_tile_count(plan: Plan, input_size: tuple[int, ...]) -> None:
    """Refuse, before any work, an input that would be cut into more than ``MAX_TILES``
    tiles. Every tile reads at most ``tile_size`` image pixels along an axis, and the tiles
    together read the image, so an axis needs at least ``ceil(size / tile_size)`` tiles."""
    least = math.prod(-(-int(n) // t) for n, t in zip(input_size, plan.tile_size))
    if least <= MAX_TILES:
        return
    sizes = ", ".join(f"{-(-int(n) // t):,}" for n, t in zip(input_size, plan.tile_size))
    raise user_error(
        TileSizeError,
        f"an input of size {_fmt(input_size)} would be cut into at least {least:,} tiles of "
        f"tile_size={_fmt(plan.tile_size)} ({sizes} per axis); fxstream plans at most {MAX_TILES:,} tiles per input",
        fix="a larger tile_size, or a smaller input (e.g. a lower pyramid level, or crops)",
    )


def _sum_lengths(axis: tuple[AxisTile, ...], names) -> dict:
    sums = dict.fromkeys(names, 0)
    for part in axis:
        for name, (lo, hi) in part.computed:
            sums[name if name else names[0]] += hi - lo
    return sums


def _stripe_pixels(axes, names) -> tuple:
    """Node -> pixels of the stripes stored for later tiles (upper bound: overlapping
    corners counted once per reader)."""
    totals = {}
    pieces = [[dict(part.pieces) for part in axis] for axis in axes]
    for name in names[1:]:
        per_axis = []
        for axis in pieces:
            own, other = 0, 0
            for part in axis:
                segments = part.get(name, ())
                for _j, (lo, hi) in segments[:-1]:
                    other += hi - lo
                if segments:
                    own += segments[-1][1][1] - segments[-1][1][0]
            per_axis.append((own, other))
        if not per_axis:
            continue
        total_all = math.prod(own + other for own, other in per_axis)
        total_own = math.prod(own for own, _ in per_axis)
        if total_all - total_own:
            totals[name] = total_all - total_own
    return tuple(totals.items())


# --- Recompute schedule: per-axis cone walk ---------------------------------------------


def _walk(geo: TrunkGeometry, sizes: dict, axis: int, block: Pair) -> tuple[dict, dict]:
    """Along ``axis``: the interval every node computes for the primary output ``block`` (and
    the other outputs' aligned blocks), and the raw interval (padding included) each consumer
    reads of each producer."""
    need = planner.output_blocks(geo, sizes, axis, block)
    raw: dict = {}
    for step in reversed(geo.steps):
        region = need.get(step.name)
        if region is None:
            continue
        region = need[step.name] = _non_empty(region, sizes[step.name][axis])
        for producer in step.inputs:
            n = sizes[producer][axis]
            edge = step.stencils[axis].read(region, n) if step.stencils else region
            raw[(step.name, producer)] = edge
            src = g.source_interval(edge, n, step.fill)
            old = need.get(producer)
            need[producer] = _hull(src, old) if old is not None else src
    need[geo.image] = _non_empty(need[geo.image], sizes[geo.image][axis])
    return need, raw


def _recompute_axis(geo: TrunkGeometry, sizes: dict, axis: int, block: Pair) -> AxisTile:
    need, raw = _walk(geo, sizes, axis, block)
    blocks = planner.output_blocks(geo, sizes, axis, block)
    return _axis_tile(geo, sizes, axis, block, blocks, need, need, raw)


def _axis_tile(geo, sizes, axis, block, blocks, computed, region, raw, pieces=()) -> AxisTile:
    """The per-slot entries of one block along ``axis`` (``blocks``: output -> its block)."""
    steps = geo.steps_by_name
    entries = []
    for slot in geo.slots:
        step = steps.get(slot.consumer)
        n = sizes[slot.producer][axis]
        if slot.kind == "trim":
            op, r = step.stencils[axis], computed[step.name]
            made = op.produced(raw[(step.name, slot.producer)], n)
            entries.append(Crop(geo.axis_dims(step.name)[axis], r.lo - made.lo, r.hi - made.lo, 0, 0))
        elif slot.kind == "resample":
            dim = geo.axis_dims(step.name)[axis]
            entries.append(
                _resample_entry(step.stencils[axis], computed[step.name], raw[(step.name, slot.producer)], n, dim)
            )
        elif slot.kind == "counts":
            entries.append(step.stencils[axis].window_counts(computed[step.name], n, step.include_pad))
        else:
            edge = raw[(slot.consumer, slot.producer)] if slot.consumer else blocks[slot.producer]
            fill = step.fill if step is not None else "constant"
            dims = (geo.axis_dims(slot.producer)[axis],)
            entries.append(_window_entry([edge], [region[slot.producer]], [n], dims, fill)[0])
    pairs = lambda d: tuple(("" if k == geo.image else k, (int(v.lo), int(v.hi))) for k, v in d.items())  # noqa: E731
    reads = tuple((edge, (int(r.lo), int(r.hi))) for edge, r in raw.items())
    out = tuple((int(blocks[o].lo), int(blocks[o].hi)) for o in geo.outputs)
    return AxisTile(block, pairs(computed), pairs(region), tuple(entries), reads, pieces, out)


# --- Carry schedule: cells, regions and stripes -------------------------------------------


def cell_boundaries(geo: TrunkGeometry, sizes: dict, axis: int, out_bounds: list[int]) -> dict:
    """Node -> its cell boundaries along ``axis`` for the primary output's boundaries
    ``out_bounds`` (ascending; ``0`` and the output size map to ``0`` and the node size).
    Another trunk output's boundary is at least its aligned one (``plan.aligned``): its
    cells are its blocks."""
    consumers: dict = {}
    for step in geo.steps:
        for producer in step.inputs:
            consumers.setdefault(producer, []).append(step)
    bounds = {geo.output: list(out_bounds)}
    n_out = sizes[geo.output][axis]
    for name in [s.name for s in reversed(geo.steps)][1:] + [geo.image]:
        n = sizes[name][axis]
        result = []
        for k, b in enumerate(out_bounds):
            if b <= 0 or b >= n_out:
                result.append(0 if b <= 0 else n)
                continue
            hi = planner.aligned(b, n_out, n) if name in geo.outputs else 0
            for w in consumers.get(name, ()):
                bw = bounds[w.name][k]
                if bw <= 0:
                    continue
                # what cells 0..k-1 of w read: with a constant fill the last output reads furthest;
                # reflect/replicate padding at the left border also reads mirrored pixels
                block = g.Interval(bw - 1, bw) if w.fill == "constant" else g.Interval(0, bw)
                read = w.stencils[axis].read(block, n) if w.stencils else block
                if w.fill == "constant":  # a read past the end (padding) still ends at n
                    hi = max(hi, min(int(read.hi), n))
                else:
                    src = g.source_interval(read, n, w.fill)
                    hi = max(hi, int(src.hi)) if not src.is_empty() else hi
            result.append(min(max(hi, result[-1] if result else 0), n))
        bounds[name] = result
    return bounds


def carry_bounds(geo: TrunkGeometry, plan: Plan, sizes: dict) -> list[list[int]]:
    """Per axis, the trunk-output boundaries of the carry tiles: the fewest blocks whose
    image region fits ``tile_size``, then boundaries that would leave a node with an empty
    cell are dropped."""
    result = []
    for axis, limit in enumerate(plan.tile_size):
        n_out = sizes[geo.output][axis]
        width = widths.carry_width(functools.partial(_carry_width, geo, sizes, axis), geo, sizes, axis)
        split = carry_split(width, n_out, limit, plan.block[axis])
        if split is None:
            minimum = tuple(_smallest_carry_tile(geo, sizes, a) for a in range(len(plan.tile_size)))
            raise TileSizeError(
                f"tile_size={_fmt(plan.tile_size)} is too small for an input of size {_fmt(sizes[geo.image])} "
                f"under the carry schedule: a tile of one output pixel reads up to {minimum[axis]} image pixels along "
                f"spatial axis {axis} (its cell, the halo it reads from the image, and at the first tile the right "
                f"halo of its first output pixel). Use a tile of at least {_fmt(minimum)} for this input size "
                f"(the plan's receptive field is {_fmt(plan.receptive_field)}, its stride {_fmt(plan.stride)}).",
                minimum=minimum,
            )
        bounds = [0] + [int(b.hi) for b in split]
        result.append(_drop_empty(geo, sizes, axis, bounds))
    return result


def _smallest_carry_tile(geo: TrunkGeometry, sizes: dict, axis: int) -> int:
    """The smallest tile edge along ``axis`` whose carry split exists for these sizes."""
    width = widths.carry_width(functools.partial(_carry_width, geo, sizes, axis), geo, sizes, axis)
    return widths.widest_unit_block(width, sizes[geo.output][axis])


def carry_split(width, n: int, limit: int, block: int):
    """The output blocks of one axis: the fewest whose carry regions (``width``) fit
    ``limit``. (``block``, the plan's block, is for tests that force small tiles.)"""
    return fitted_split(width, n, limit)


def _carry_width(geo: TrunkGeometry, sizes: dict, axis: int, lo: int, hi: int) -> int:
    """The extent of the image region a carry tile with output block ``[lo, hi)`` reads."""
    bounds = cell_boundaries(geo, sizes, axis, [lo, hi])
    region = _carry_regions(geo, sizes, axis, bounds, 0)[1][geo.image]
    return int(region.hi - region.lo)


def _drop_empty(geo: TrunkGeometry, sizes: dict, axis: int, out_bounds: list[int]) -> list[int]:
    while len(out_bounds) > 2:
        bounds = cell_boundaries(geo, sizes, axis, out_bounds)
        empty = next(
            (k for name, b in bounds.items() if name != geo.image for k in range(len(b) - 1) if b[k + 1] <= b[k]),
            None,
        )
        if empty is None:
            break
        out_bounds = (
            out_bounds[: empty + 1] + out_bounds[empty + 2 :]
            if empty + 1 < len(out_bounds) - 1
            else (out_bounds[:empty] + out_bounds[empty + 1 :])
        )
    return out_bounds


def _carry_regions(geo: TrunkGeometry, sizes: dict, axis: int, bounds: dict, k: int) -> tuple[dict, dict, dict]:
    """For cell ``k``: node -> its cell, node -> its region (its cell and every consumer's
    source read), and the raw reads of every edge."""
    cells = {name: g.Interval(b[k], b[k + 1]) for name, b in bounds.items()}
    region = dict(cells)
    # the image is read from the input, not carried: its region is what its consumers read
    region[geo.image] = g.Interval(0, 0)
    raw: dict = {}
    for step in geo.steps:
        cell = cells[step.name]
        if cell.is_empty():  # only while fitting blocks (_carry_width); tiles have no empty cells
            continue
        for producer in step.inputs:
            n = sizes[producer][axis]
            edge = step.stencils[axis].read(cell, n) if step.stencils else cell
            raw[(step.name, producer)] = edge
            src = g.source_interval(edge, n, step.fill)
            if not src.is_empty():
                region[producer] = _hull(src, region[producer])
    if region[geo.image].is_empty():
        region[geo.image] = cells[geo.image]
    return cells, region, raw


def _carry_axis(
    geo: TrunkGeometry, sizes: dict, axis: int, out_bounds: list[int], bands: tuple[int, ...] = (0,)
) -> list[AxisTile]:
    """The carry tiles of one axis. At a band start ``k`` (``bands``), every node's cell ``k``
    starts at the recompute cone of output block ``k`` instead, so the band reads no stripe of
    the previous band (the cells overlap there and both bands compute the overlap)."""
    bounds = cell_boundaries(geo, sizes, axis, out_bounds)
    tiles = []
    local, first = bounds, 0  # the cell boundaries of the current band, and its first block
    for k in range(len(out_bounds) - 1):
        if k > 0 and k in bands:
            local, first = _band_bounds(geo, sizes, axis, out_bounds, bounds, k), k
        cells, region, raw = _carry_regions(geo, sizes, axis, local, k)
        for name, r in region.items():
            if r.hi > cells[name].hi or (name != geo.image and r.lo < local[name][first]):
                raise TileSizeError(f"planner: cell {k} of '{name}' is read beyond its band ({r} vs {cells[name]})")
        computed = dict(cells)
        computed[geo.image] = region[geo.image]  # the image is read from the input, not carried
        pieces = tuple((name, _segments(local[name], region[name], k, first)) for name in _carried(geo))
        # an output's block is its cell in the whole tiling (a band's first cells overlap the previous band's)
        blocks = {o: g.Interval(bounds[o][k], bounds[o][k + 1]) for o in geo.outputs}
        block = (out_bounds[k], out_bounds[k + 1])
        tiles.append(_axis_tile(geo, sizes, axis, block, blocks, computed, region, raw, pieces))
    return tiles


def _band_bounds(geo: TrunkGeometry, sizes: dict, axis: int, out_bounds: list[int], bounds: dict, k: int) -> dict:
    """``bounds`` with every node's boundary ``k`` moved down to the start of the recompute
    cone of output block ``k``: the first cells of a band that starts at block ``k``."""
    cone = _walk(geo, sizes, axis, (out_bounds[k], out_bounds[k + 1]))[0]
    result = {}
    for name, b in bounds.items():
        lo = min(int(cone[name].lo), b[k]) if name in cone else b[k]
        result[name] = b[:k] + [lo] + b[k + 1 :]
    return result


def _carried(geo: TrunkGeometry) -> list[str]:
    """The nodes that other trunk nodes read (their regions may hold earlier cells)."""
    producers = {p for step in geo.steps for p in step.inputs}
    return [s.name for s in geo.steps if s.name in producers]


def _segments(bounds: list[int], region: g.Interval, k: int, first: int = 0) -> tuple:
    """``region`` cut at the cell boundaries: ((cell index, (lo, hi)), ...), the last the cell
    ``k``; cells before ``first`` (an earlier band) are never read."""
    segments = []
    start = bisect.bisect_right(bounds, region.lo, first, k + 2) - 1  # cells before it end at or before region.lo
    for j in range(min(max(first, start), k), k + 1):
        lo, hi = max(region.lo, bounds[j]), min(region.hi, bounds[j + 1])
        if hi > lo or j == k:
            segments.append((j, (int(lo), int(hi))))
    return tuple(segments)
