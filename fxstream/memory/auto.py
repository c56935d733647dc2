"""Automatic tile size and streaming boundary, from the memory and cost models.

``fxstream.compile(model, "auto", memory_budget="8GiB", input_shape=(1, 3, 8192, 8192))``

* **Tile size.** The largest square tile edge ``t`` whose predicted training peak (see
  :mod:`fxstream.memory.model`) fits the budget. The prediction is a step function of ``t``
  that never decreases (a larger tile computes larger regions everywhere), so a
  bisection over the integers from the smallest valid tile (one output pixel per tile)
  to the tile that covers the whole image finds it exactly. The input shape is needed:
  the input, the trunk output and its gradient are part of the peak and scale with it.
* **Boundary.** Candidate cuts are trunk nodes that separate the trunk (nothing after
  the cut reads a node before it): for each cumulative stride, the last such node, and
  the whole trunk. A cut streams the prefix and runs the rest with plain autograd on
  the assembled (low-resolution) feature map. Predicted time, in forward FLOPs of the
  whole-image trunk: the streamed part costs ``4 * h * F_prefix`` (each tile runs forward,
  then is recomputed and back-propagated: ``h + h + 2h``, with ``h`` the FLOP-weighted halo
  overhead of the schedule's tiles; ``h = 1`` under carry), the rest ``3 * F_rest``. The fastest candidate
  whose predicted peak fits the budget wins.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import TileSizeError, UnsupportedOpError
from ..planning.lower import Lowered, lower
from ..planning.plan import build_plan, node_sizes, tile_tuple
from ..planning.schedule import DEFAULT_BAND_ROWS, Schedule
from ..planning.trunk import Slot, TrunkGeometry
from .model import MemoryModel, block_for, parameter_bytes
from .nodestats import TrunkStats, measure
from .units import format_bytes, parse_bytes


@dataclass(frozen=True)
class Candidate:
    boundary: str  # trunk output node of the streamed part
    tile: int | None  # None: no tile fits the budget
    peak: int  # predicted training peak at that tile (or at the smallest tile), on the compute device
    cost: float  # predicted time, in whole-image trunk forward FLOPs (inf if it does not fit)
    stride: tuple
    schedule: Schedule | None = None  # with the stripe placement it was fitted with


@dataclass(frozen=True)
class Choice:
    tile_size: int | tuple[int, ...]
    boundary: str | None
    reason: str
    candidates: tuple[Candidate, ...]
    schedule: Schedule | None = None  # the schedule to compile with (its stripes chosen if they were 'auto')


def choose(
    model: nn.Module,
    tile_size,
    boundary,
    budget: int | str | None,
    input_shape: tuple[int, ...] | None,
    dtype: torch.dtype | None = None,
    schedule=None,
    device: str | None = None,
    output_device: str | None = None,
) -> Choice:
    """Resolve ``tile_size="auto"`` and/or ``boundary="auto"`` (see the module docstring) for
    a compute device of type ``device`` (default: the model's) and the trunk output on
    ``output_device``. Under carry with ``stripes="auto"``, also where the stripes live."""
    if input_shape is None or len(input_shape) < 3:
        raise TileSizeError(
            "tile_size='auto' and boundary='auto' need input_shape=(N, C, *spatial), the shape of the inputs "
            "you will train on (the largest, if sizes vary): the peak memory depends on it"
        )
    if budget is None:
        raise TileSizeError("tile_size='auto' and boundary='auto' need memory_budget=... (e.g. '8GiB' or bytes)")
    try:
        budget = parse_bytes(budget)
    except ValueError as exc:
        raise TileSizeError(f"memory_budget: {exc}") from None
    auto_tile = tile_size == "auto"
    probe_tile = (1 << 20) if auto_tile else tile_size
    program = _program(model, probe_tile, boundary, schedule)
    schedule = program.schedule
    device = device or _model_device(model)
    geo = program.geometry
    spatial = tuple(input_shape[2:])
    if len(spatial) != geo.ndim:
        raise TileSizeError(
            f"input_shape={tuple(input_shape)} has {len(spatial)} spatial dims, the trunk has {geo.ndim}"
        )
    dtype = dtype or _model_dtype(model)
    stats = measure(program.analysis, geo, input_shape[1], dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    cuts = cut_candidates(geo, program.plan) if boundary == "auto" else [geo.output]
    candidates = []
    for cut in cuts:
        part = prefix_geometry(geo, cut)
        params = parameter_bytes(program.analysis, {s.name for s in part.steps}, itemsize)

        def model_for(tile, option, part=part, params=params):
            return MemoryModel(
                part,
                build_plan(part, tile_tuple(tile, geo.ndim), option.carries),
                stats,
                params,
                input_shape[0],
                trunk=geo,
                schedule=option,
                device=device,
                output_device=output_device,
            )

        for option in stripe_options(schedule, device):  # the fastest placement first
            fitted = _fit(model_for, option, stats, geo, spatial, probe_tile, auto_tile, budget, cut)
            if fitted.cost != float("inf"):
                break
        candidates.append(fitted)
    fitting = [c for c in candidates if c.cost != float("inf")]
    if not fitting:
        best = min(candidates, key=lambda c: c.peak)
        tile = "the smallest tile" if auto_tile else f"tile_size={tile_size}"
        raise TileSizeError(
            f"memory_budget={format_bytes(budget)} is too small for input_shape={tuple(input_shape)}: the smallest "
            f"prediction is {format_bytes(best.peak)} (streaming up to '{best.boundary}' with {tile}). "
            "Raise the budget, or train on smaller inputs."
        )
    best = min(fitting, key=lambda c: c.cost)
    chosen_boundary = None if best.boundary == geo.output and boundary != "auto" else best.boundary
    if boundary is not None and boundary != "auto":
        chosen_boundary = boundary
    reason = _reason(best, candidates, budget, auto_tile, boundary == "auto", schedule)
    return Choice(best.tile, chosen_boundary, reason, tuple(candidates), best.schedule)


def stripe_options(schedule: Schedule, device: str) -> list[Schedule]:
    """The schedules to try, fastest first: under carry with ``stripes="auto"``, the stripes
    on the device (no copies), then in host memory (on an accelerator), then banded (one
    more forward pass); otherwise ``schedule`` itself."""
    if not schedule.carries or schedule.stripes != "auto":
        return [schedule]
    placements = ["device", "host", "banded"] if device != "cpu" else ["device", "banded"]
    return [schedule.with_stripes(p) for p in placements]


def _fit(model_for, option: Schedule, stats, geo, spatial, probe_tile, auto_tile: bool, budget: int, cut) -> Candidate:
    """The candidate of one schedule: the largest tile that fits (``auto_tile``) or the given
    one; under banded carry also the band height (the tallest bands that fit, from
    ``DEFAULT_BAND_ROWS`` tile rows down to one, then doubled while they fit)."""
    if not option.banded:
        return _fitted_tile(model_for, option, stats, geo, spatial, probe_tile, auto_tile, budget, cut)
    heights = [DEFAULT_BAND_ROWS, 2, 1]
    for rows in heights:
        fitted = _fitted_tile(
            model_for, option.with_stripes("banded", rows), stats, geo, spatial, probe_tile, auto_tile, budget, cut
        )
        if fitted.cost != float("inf"):
            break
    else:
        return fitted
    grid_rows = model_for(fitted.tile, fitted.schedule)._shape_plan(spatial).grid[0]
    while rows * 2 <= grid_rows:  # taller bands: fewer band-start cones and rebuilds
        taller = _candidate(
            model_for, option.with_stripes("banded", rows * 2), stats, geo, spatial, fitted.tile, budget, cut
        )
        if taller.cost == float("inf"):
            break
        rows, fitted = rows * 2, taller
    return fitted


def _fitted_tile(model_for, option, stats, geo, spatial, probe_tile, auto_tile: bool, budget: int, cut) -> Candidate:
    tile = probe_tile
    if auto_tile:
        tile = largest_tile(model_for(probe_tile, option), spatial, budget)
        if tile is not None:
            tile = exact_fit(lambda t: model_for(t, option), spatial, tile, budget)
    return _candidate(model_for, option, stats, geo, spatial, tile, budget, cut)


def _program(model: nn.Module, tile, boundary, schedule) -> Lowered:
    """The trunk the choice cuts: with ``boundary="auto"``, the whole local trunk, or
    where a non-local op sits inside it, its largest streamable prefix."""
    if boundary != "auto":
        return lower(model, tile, boundary, schedule)
    try:
        return lower(model, tile, None, schedule)
    except UnsupportedOpError as err:
        if err.boundary is None:
            raise
        return lower(model, tile, err.boundary, schedule)


def _model_device(model: nn.Module) -> str:
    """The type of the device the model's parameters are on ('cpu' without any)."""
    param = next(iter(model.parameters()), None)
    return param.device.type if param is not None else "cpu"


def _model_dtype(model: nn.Module) -> torch.dtype:
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    return param.dtype if param is not None else torch.float32


def largest_tile(memory: MemoryModel, spatial: tuple[int, ...], budget: int) -> int | None:
    """The largest square tile edge whose predicted peak fits ``budget`` (None if none)."""
    plan = memory.plan
    lo = max(plan.receptive_field)
    while any(block_for(plan, axis, lo) < 1 for axis in range(memory.geo.ndim)):
        lo += 1
    out = node_sizes(memory.trunk, spatial)[memory.geo.output]
    hi = max(lo, *(math.ceil(s * n) + left + right for s, n, (left, right) in zip(plan.stride, out, plan.halo)))
    if memory.training_peak(spatial, lo) > budget:
        return None
    while lo < hi:  # invariant: lo fits
        mid = (lo + hi + 1) // 2
        if memory.training_peak(spatial, mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def exact_fit(model_for, spatial: tuple[int, ...], tile: int, budget: int) -> int | None:
    """Shrink ``tile`` (from the interior-tile formula) until the exact tiles of this input fit
    ``budget``: the planner gives border tiles, whose halo is clipped, larger blocks than
    interior ones, so their deeper layers can need more than the formula's interior tile.
    Stops early where the stripes on the device alone exceed the budget (they only grow as
    the tile shrinks)."""
    memory = model_for(tile)
    # carry tiles may be smaller than the receptive field (down to what the first tile needs)
    smallest = max(memory.plan.receptive_field) // (4 if memory.schedule.carries else 1)
    while tile >= max(smallest, 1):
        memory = model_for(tile)
        try:
            if memory.budgeted(memory.estimate(spatial).streamed_training) <= budget:
                return tile
            if _device_stripes(memory, spatial) + memory.params.trunk >= budget:
                return None
        except TileSizeError:  # below what this input's first carry tile needs
            return None
        tile -= max(1, tile // 32)
    return None


def _device_stripes(memory: MemoryModel, spatial: tuple[int, ...]) -> int:
    """The most bytes of stripes on the compute device in any phase of a step."""
    phases = memory.stripe_parts(spatial).values()
    return max((sum(v for k, v in parts.items() if memory.where(k) == "device") for parts in phases), default=0)


def _candidate(model_for, option, stats: TrunkStats, geo, spatial, tile, budget, cut) -> Candidate:
    if tile is None:
        memory = model_for(1 << 20, option)
        smallest = max(memory.plan.receptive_field)
        stride = next(n.stride for n in memory.plan.nodes if n.name == cut)
        return Candidate(cut, None, memory.training_peak(spatial, smallest), float("inf"), stride, option)
    memory = model_for(tile, option)
    stride = next(n.stride for n in memory.plan.nodes if n.name == cut)
    try:  # the exact tiles, as exact_fit checked them
        peak = memory.budgeted(memory.estimate(spatial).streamed_training)
    except TileSizeError:  # a banded tiling with more bands than this input has tile rows, or a too small tile
        return Candidate(cut, None, memory.training_peak(spatial, tile), float("inf"), stride, option)
    cost = predicted_cost(memory, stats, geo, spatial)
    return Candidate(cut, tile, peak, cost if peak <= budget else float("inf"), stride, option)


def predicted_cost(memory: MemoryModel, stats: TrunkStats, geo: TrunkGeometry, spatial: tuple[int, ...]) -> float:
    """Predicted time of a training step in whole-image trunk forward FLOPs:
    ``4 * h * F_streamed + 3 * F_rest`` (see the module docstring), where ``h * F_streamed``
    is what the schedule's tiles compute (``h = 1`` under carry, more with band-start cones).
    Banded carry rebuilds all bands but the last: ``(5 - 1/B) * h * F_streamed``."""
    tiled, streamed, rest = trunk_flops(memory, stats, geo, spatial)
    passes = 4.0
    if memory.schedule.banded:
        shape = memory._shape_plan(spatial)
        passes += 1.0 - 1.0 / len(shape.band_ranges(range(shape.num_tiles)))
    return (passes * tiled + 3 * rest) / (streamed + rest)


def trunk_flops(memory: MemoryModel, stats: TrunkStats, geo: TrunkGeometry, spatial: tuple[int, ...]) -> tuple:
    """Forward FLOPs ``(all tiles of the streamed part, its whole-image pass, the plain
    rest)``; ``tiled / streamed`` is the FLOP-weighted halo overhead ``h``."""
    flops = {s.name: s.flops_per_pixel for s in stats.nodes}
    sizes = node_sizes(geo, spatial)
    streamed = [s.name for s in memory.geo.steps]
    rest = [s.name for s in geo.steps if s.name not in set(streamed)]
    tiled = 0
    for shape in memory.tile_shapes(spatial):
        tiled += shape.count * sum(flops[n] * shape.px[n] for n in streamed)
    whole = lambda names: sum(flops[n] * math.prod(sizes[n]) for n in names)  # noqa: E731
    return tiled, whole(streamed), whole(rest)


def cut_candidates(geo: TrunkGeometry, plan) -> list[str]:
    """Trunk nodes that separate the trunk: for each cumulative stride the last one,
    and the trunk output."""
    order = [geo.image] + [s.name for s in geo.steps]
    index = {name: i for i, name in enumerate(order)}
    reach = list(range(len(order)))
    for step in geo.steps:
        for producer in step.inputs:
            reach[index[producer]] = max(reach[index[producer]], index[step.name])
    strides = {n.name: n.stride for n in plan.nodes}
    last_by_stride: dict = {}
    furthest = 0
    for k in range(1, len(order)):
        furthest = max(furthest, reach[k - 1])
        if furthest <= k:  # no edge jumps over node k
            last_by_stride[strides[order[k]]] = order[k]
    cuts = list(dict.fromkeys(list(last_by_stride.values()) + [geo.output]))
    return sorted(cuts, key=index.get)


def prefix_geometry(geo: TrunkGeometry, cut: str) -> TrunkGeometry:
    """The trunk up to the separating node ``cut``, as its own geometry: its outputs are
    the trunk outputs before ``cut`` and ``cut`` itself."""
    if cut == geo.output:
        return geo
    names = [s.name for s in geo.steps]
    steps = geo.steps[: names.index(cut) + 1]
    kept = {s.name for s in steps}
    outputs = tuple(o for o in geo.outputs if o in kept and o != cut) + (cut,)
    slots = tuple(s for s in geo.slots if s.consumer in kept) + tuple(Slot("window", "", o) for o in outputs)
    dims = tuple((n, d) for n, d in geo.dims if n in kept or n == geo.image)
    return dataclasses.replace(geo, output=cut, steps=steps, dims=dims, slots=slots, outputs=outputs)


def _reason(best: Candidate, candidates: list, budget: int, auto_tile: bool, auto_boundary: bool, schedule) -> str:
    lines = []
    what = []
    if auto_tile:
        what.append(f"tile_size={best.tile}")
    if auto_boundary:
        what.append(f"boundary={best.boundary!r}")
    if schedule.carries and schedule.stripes == "auto" and best.schedule is not None:
        what.append(f"stripes={best.schedule.stripes!r}")
        if best.schedule.banded:
            what.append(f"band_rows={best.schedule.band_rows}")
    lines.append(
        f"fxstream: chose {', '.join(what)}: predicted training peak {format_bytes(best.peak)} "
        f"within the budget of {format_bytes(budget)}"
    )
    if auto_boundary and len(candidates) > 1:
        lines.append("  candidates (predicted time in whole-image forward passes of the trunk):")
        for c in candidates:
            tile = "no tile fits" if c.tile is None else f"tile {c.tile}"
            cost = "-" if c.tile is None else "over the budget" if c.cost == float("inf") else f"{c.cost:.2f}"
            mark = "  <- fastest within the budget" if c is best else ""
            stripes = f", {c.schedule}" if c.schedule is not None and c.schedule.carries and c.tile is not None else ""
            lines.append(
                f"    up to {c.boundary!r} (stride {'x'.join(map(str, c.stride))}): {tile}{stripes}, "
                f"peak {format_bytes(c.peak)}, time {cost}{mark}"
            )
    elif auto_tile:
        lines.append("  the largest tile whose predicted peak fits (a larger tile means less halo recomputation)")
    if best.schedule is not None and best.schedule.carries and schedule.stripes == "auto":
        if best.schedule.stripes == "host":
            lines.append("  the stripes do not fit on the device: kept in host memory (copies overlap compute)")
        elif best.schedule.banded:
            lines.append(
                "  the stripes do not fit on the device: banded carry rebuilds them band by band "
                "(one more forward pass, about 5/3 of a plain step)"
            )
    return "\n".join(lines)
