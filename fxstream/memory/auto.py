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
  whose predicted peak fits the budget wins; among candidates within 5% of the fastest
  (``TIE``), the one that streams the most.
* **Global statistics** (issue 20). A streamed node that ``u`` statistics passes compute
  costs ``4 * h * F (1 + u)``. Each cut is analysed again with ``boundary=cut``: a statistic
  whose uses lie after the cut is a head reduction of the prefix (its input becomes a prefix
  output), so the prefix runs fewer passes. The whole model is a candidate when it holds at
  most ``max_levels`` levels; otherwise the candidates are cuts of the largest prefix within
  ``max_levels``, and the whole model is listed as excluded. For large images the plain rest
  of a prefix does not fit, and the whole model wins; when it fits, a prefix before the
  statistics is faster and is chosen.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..analysis.analyze import MAX_LEVELS
from ..errors import StatisticsError, TileSizeError, UnsupportedOpError
from ..planning.lower import Lowered, lower
from ..planning.plan import build_plan, node_sizes, tile_tuple
from ..planning.trunk import Slot, TrunkGeometry
from .model import MemoryModel, block_for, parameter_bytes
from .nodestats import TrunkStats, measure
from .units import format_bytes, parse_bytes

TIE = 0.05  # candidates within this fraction of the fastest one's time count as equally fast


@dataclass(frozen=True)
class Candidate:
    boundary: str  # trunk output node of the streamed part
    tile: int | None  # None: no tile fits the budget
    peak: int  # predicted training peak at that tile (or at the smallest tile)
    cost: float  # predicted time, in whole-image trunk forward FLOPs (inf if it does not fit)
    stride: tuple
    levels: int = 0  # levels of global statistics the streamed part holds
    excluded: str = ""  # why it was not considered (e.g. more levels than max_levels)


@dataclass(frozen=True)
class Choice:
    tile_size: int | tuple[int, ...]
    boundary: str | None
    reason: str
    candidates: tuple[Candidate, ...]


def choose(
    model: nn.Module,
    tile_size,
    boundary,
    budget: int | str | None,
    input_shape: tuple[int, ...] | None,
    dtype: torch.dtype | None = None,
    schedule=None,
    max_levels: int | None = MAX_LEVELS,
) -> Choice:
    """Resolve ``tile_size="auto"`` and/or ``boundary="auto"`` (see the module docstring)."""
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
    program, refused = _program(model, probe_tile, boundary, schedule, max_levels)
    schedule = program.schedule
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
    candidates = [_excluded(refused, max_levels)] if refused is not None else []
    for cut in cuts:
        part = _cut_geometry(model, probe_tile, program, cut, schedule, max_levels)
        params = parameter_bytes(program.analysis, {s.name for s in part.steps}, itemsize)
        model_for = lambda tile, part=part, params=params: MemoryModel(  # noqa: E731
            part,
            build_plan(part, tile_tuple(tile, geo.ndim), schedule.carries),
            stats,
            params,
            input_shape[0],
            trunk=geo,
            schedule=schedule,
        )
        tile = largest_tile(model_for(probe_tile), spatial, budget) if auto_tile else probe_tile
        if auto_tile and tile is not None:
            tile = exact_fit(model_for, spatial, tile, budget)
        candidates.append(_candidate(model_for, stats, geo, spatial, tile, budget, cut_spec(geo, cut), part.levels))
    fitting = [c for c in candidates if c.cost != float("inf") and not c.excluded]
    if not fitting:
        best = min(candidates, key=lambda c: c.peak)
        tile = "the smallest tile" if auto_tile else f"tile_size={tile_size}"
        raise TileSizeError(
            f"memory_budget={format_bytes(budget)} is too small for input_shape={tuple(input_shape)}: the smallest "
            f"prediction is {format_bytes(best.peak)} (streaming up to '{best.boundary}' with {tile}). "
            "Raise the budget, or train on smaller inputs."
        )
    best = pick(fitting)
    chosen_boundary = None if best.boundary == geo.output and boundary != "auto" else best.boundary
    if boundary is not None and boundary != "auto":
        chosen_boundary = boundary
    reason = _reason(best, candidates, budget, auto_tile, boundary == "auto")
    return Choice(best.tile, chosen_boundary, reason, tuple(candidates))


def pick(fitting: list[Candidate]) -> Candidate:
    """The fastest candidate; among those within ``TIE`` of it, the one that streams the most
    (candidates go from the smallest prefix to the whole trunk)."""
    fastest = min(c.cost for c in fitting)
    return [c for c in fitting if c.cost <= (1 + TIE) * fastest][-1]


def _program(model: nn.Module, tile, boundary, schedule, max_levels: int | None = MAX_LEVELS) -> tuple:
    """The trunk the choice cuts, and the error that refused the whole model for its levels
    (or None): with ``boundary="auto"``, the whole trunk, or where a non-local op sits inside it
    (or more than ``max_levels`` levels of global statistics), its largest streamable prefix."""
    if boundary != "auto":
        return lower(model, tile, boundary, schedule, max_levels), None
    try:
        return lower(model, tile, None, schedule, max_levels), None
    except UnsupportedOpError as err:
        if err.boundary is None:
            raise
        refused = err if isinstance(err, StatisticsError) else None
        return lower(model, tile, err.boundary, schedule, max_levels), refused


def _excluded(err: StatisticsError, max_levels: int) -> Candidate:
    """The whole model, refused for its levels: listed, never chosen."""
    why = f"{err.levels} levels > max_levels={max_levels}, predicted {err.predicted_step_ratio:.1f}x a plain step"
    return Candidate("<whole model>", None, 0, float("inf"), (), err.levels, why)


def _cut_geometry(model: nn.Module, tile, program: Lowered, cut: str, schedule, max_levels) -> TrunkGeometry:
    """The streamed part of a cut: the trunk itself, or, analysed again with ``boundary=cut``,
    its prefix (a statistic whose uses lie after the cut is a head reduction there); without
    statistics, the prefix of the trunk's geometry."""
    geo = program.geometry
    if cut == geo.output:
        return geo
    if not geo.statistics:
        return prefix_geometry(geo, cut)
    return lower(model, tile, cut_spec(geo, cut), schedule, max_levels).geometry


def cut_spec(geo: TrunkGeometry, cut: str) -> str:
    """``boundary=`` for the cut at node ``cut``: its name, or for a decomposed norm's
    application (a node the traced model does not have) the norm's module path."""
    step = geo.steps_by_name[cut]
    return step.module_path if step.op == "normalize" and step.module_path else cut


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
    interior ones, so their deeper layers can need more than the formula's interior tile."""
    memory = model_for(tile)
    # carry tiles may be smaller than the receptive field (down to what the first tile needs)
    smallest = max(memory.plan.receptive_field) // (4 if memory.schedule.carries else 1)
    while tile >= max(smallest, 1):
        try:
            if model_for(tile).estimate(spatial).streamed_training.total <= budget:
                return tile
        except TileSizeError:  # below what this input's first carry tile needs
            return None
        tile -= max(1, tile // 32)
    return None


def _candidate(model_for, stats: TrunkStats, geo, spatial, tile, budget, cut, levels: int = 0) -> Candidate:
    if tile is None:
        memory = model_for(1 << 20)
        smallest = max(memory.plan.receptive_field)
        stride = next(n.stride for n in memory.plan.nodes if n.name == memory.geo.output)
        return Candidate(cut, None, memory.training_peak(spatial, smallest), float("inf"), stride, levels)
    memory = model_for(tile)
    stride = next(n.stride for n in memory.plan.nodes if n.name == memory.geo.output)
    try:  # the exact tiles' prediction, as exact_fit checked it (the interior formula can differ by a few MiB)
        peak = memory.estimate(spatial).streamed_training.total
    except TileSizeError:  # below what this input's first carry tile needs
        peak = memory.training_peak(spatial, tile)
    cost = predicted_cost(memory, stats, geo, spatial)
    return Candidate(cut, tile, peak, cost if peak <= budget else float("inf"), stride, levels)


def predicted_cost(memory: MemoryModel, stats: TrunkStats, geo: TrunkGeometry, spatial: tuple[int, ...]) -> float:
    """Predicted time of a training step in whole-image trunk forward FLOPs:
    ``4 * sum_v tiled_v (1 + u_v) + 3 * F_rest`` (see the module docstring), where ``tiled_v``
    is what the schedule's tiles compute of node ``v`` (``h = 1`` under carry) and ``u_v`` the
    number of statistics passes that compute it (issue 20: :func:`pass_uses`)."""
    tiled, whole = node_flops(memory, stats, spatial)
    u = pass_uses(memory.geo)
    rest = sum(flops * math.prod(size) for flops, size in _rest(memory, stats, geo, spatial))
    streamed = sum(4 * t * (1 + u.get(name, 0)) for name, t in tiled.items())
    return (streamed + 3 * rest) / (sum(whole.values()) + rest)


def pass_uses(geo: TrunkGeometry) -> dict:
    """Trunk node -> ``u``: how many statistics passes compute it (each also runs it backward)."""
    u: dict = {}
    for nodes in geo.passes:
        for name in nodes:
            u[name] = u.get(name, 0) + 1
    return u


def node_flops(memory: MemoryModel, stats: TrunkStats, spatial: tuple[int, ...]) -> tuple[dict, dict]:
    """Per streamed node, forward FLOPs over all tiles of one pass, and of one whole-image pass."""
    flops = {s.name: s.flops_per_pixel for s in stats.nodes}
    sizes = node_sizes(memory.trunk, spatial)
    names = [s.name for s in memory.geo.steps]
    tiled = dict.fromkeys(names, 0.0)
    for shape in memory.tile_shapes(spatial):
        for n in names:
            tiled[n] += shape.count * flops[n] * shape.px[n]
    return tiled, {n: flops[n] * math.prod(sizes[n]) for n in names}


def _rest(memory: MemoryModel, stats: TrunkStats, geo: TrunkGeometry, spatial: tuple[int, ...]) -> list:
    flops = {s.name: s.flops_per_pixel for s in stats.nodes}
    sizes = node_sizes(geo, spatial)
    streamed = {s.name for s in memory.geo.steps}
    return [(flops[s.name], sizes[s.name]) for s in geo.steps if s.name not in streamed]


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
    the trunk outputs before ``cut`` and ``cut`` itself (for a trunk without global
    statistics: with them, :func:`_cut_geometry` analyses the cut again)."""
    if cut == geo.output:
        return geo
    names = [s.name for s in geo.steps]
    steps = geo.steps[: names.index(cut) + 1]
    kept = {s.name for s in steps}
    outputs = tuple(o for o in geo.outputs if o in kept and o != cut) + (cut,)
    slots = tuple(s for s in geo.slots if s.consumer in kept) + tuple(Slot("window", "", o) for o in outputs)
    dims = tuple((n, d) for n, d in geo.dims if n in kept or n == geo.image)
    size_nodes = tuple(s for s in geo.size_nodes if s.before < len(steps))  # those the prefix's steps read
    return dataclasses.replace(
        geo, output=cut, steps=steps, dims=dims, slots=slots, outputs=outputs, size_nodes=size_nodes
    )


def _reason(best: Candidate, candidates: list, budget: int, auto_tile: bool, auto_boundary: bool) -> str:
    lines = []
    what = []
    if auto_tile:
        what.append(f"tile_size={best.tile}")
    if auto_boundary:
        what.append(f"boundary={best.boundary!r}")
    lines.append(
        f"fxstream: chose {', '.join(what)}: predicted training peak {format_bytes(best.peak)} "
        f"within the budget of {format_bytes(budget)}"
    )
    if auto_boundary and len(candidates) > 1:
        lines.append("  candidates (predicted time in whole-image forward passes of the trunk):")
        for c in candidates:
            if c.excluded:
                lines.append(f"    {c.boundary}: excluded ({c.excluded}; compile(..., max_levels=...))")
                continue
            tile = "no tile fits" if c.tile is None else f"tile {c.tile}"
            cost = "-" if c.tile is None else "over the budget" if c.cost == float("inf") else f"{c.cost:.2f}"
            mark = "  <- fastest within the budget" if c is best else ""
            levels = f", {c.levels} levels of statistics" if c.levels else ""
            lines.append(
                f"    up to {c.boundary!r} (stride {'x'.join(map(str, c.stride))}{levels}): {tile}, "
                f"peak {format_bytes(c.peak)}, time {cost}{mark}"
            )
    elif auto_tile:
        lines.append("  the largest tile whose predicted peak fits (a larger tile means less halo recomputation)")
    return "\n".join(lines)
