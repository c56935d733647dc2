"""The executor: runs the tiles of a :class:`~fxstream.planning.tiling.ShapePlan` under its schedule,
as one differentiable ``autograd.Function``.

Forward (no grad, raster order): each tile runs the generated tile code on its input crop
and writes its block of every trunk output. Under the carry schedule it also stores the
stripes of its cells that later tiles read (:class:`Stripes`), and reads the stripes that
earlier tiles stored. When gradients are wanted, the last tile runs with autograd and keeps
its graph, so the backward pass does not recompute it.

Backward (reverse raster order): each tile is recomputed with autograd, from its input crop
and its stripes as detached leaves, and back-propagates

* its block of every trunk output's gradient, and
* the *pending* gradients that later tiles sent to its cells (carry only),

to the parameters, its input crop, and its stripe leaves. A stripe leaf's gradient is added
to the pending gradient of the cell it was cut from; that cell's tile runs later in this
order, so its pending gradient is complete when it runs. Every use of every activation is
back-propagated exactly once, so the summed gradients are the whole-image gradients (see
the README's "Why it is exact"). Under the recompute schedule there are no stripes and no
pending gradients: the tiles' output blocks partition the output gradients.

The recomputation re-enters the forward pass's autocast state and replays its random
draws, so it computes exactly what the forward pass computed. The order of the backward
pass is fixed, so repeated backward passes are bit-identical.

**Global statistics** (issue 20, :mod:`fxstream.runtime.passes`). A trunk with statistics
runs several applications of this function per call, one per pass (:class:`Pass`): a
*statistics pass* returns its statistics' partial sums added over the tiles in float64 (the
tiles' owned blocks partition each map), and its backward back-propagates the same
cotangent through every tile; the *output pass* is the ordinary one. Both read the
statistic values of lower levels as constant inputs: in the backward pass each tile takes
them as leaves, and their gradients are added over tiles in float64. Under carry the
statistics passes' backward reads the output pass's stripe store (same cells, same values);
a stripe is freed by the last pass whose backward reads it (``CallState.low``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import first_order
from ..io.transfer import crop as crop_view
from . import live
from .progress import Timer
from .settings import AutocastState

Key = tuple  # (node name, global box): one stored stripe


@dataclass
class Stripes:
    """The stripe bookkeeping of a carry ShapePlan, derived from its tiles.

    ``saves[p]``: node -> boxes of its cell that tile ``p`` stores for later tiles;
    ``last_forward[key]``: the last tile that reads ``key`` in the forward pass;
    ``last_backward[key]``: the first tile that reads it (the last one back-propagated)."""

    saves: list
    last_forward: dict
    last_backward: dict

    @staticmethod
    def of(shape_plan) -> Stripes:
        tiles = shape_plan.tiles
        saves: list = [{} for _ in tiles]
        last_forward: dict = {}
        last_backward: dict = {}
        for position, tile in enumerate(tiles):
            for name, _, pieces, _ in tile.carry:
                for source, box in pieces:
                    if source < 0:
                        continue
                    key = (name, box)
                    if key not in last_backward:
                        saves[source].setdefault(name, []).append(box)
                        last_backward[key] = position
                    last_forward[key] = position
        return Stripes(saves, last_forward, last_backward)


class TileRun:
    """The ``carry`` argument of the tile code for one run of one tile.

    The tile code calls ``carry.region(name, fresh)`` after computing a node's cell: it
    records the cell (for pending gradients), stores the stripes later tiles read (in the
    forward pass), and returns the node's region, assembled from stored stripes and the
    cell, which the consumers' windows crop."""

    def __init__(self, tile, dims: dict, leaves: dict, store: dict | None = None, saves: dict | None = None):
        self.specs = {name: (cell, pieces, grid) for name, cell, pieces, grid in tile.carry}
        self.dims = dims
        self.leaves = leaves
        self.store = store
        self.saves = saves or {}
        self.fresh: dict = {}

    def region(self, name: str, fresh: torch.Tensor) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return fresh
        cell, pieces, grid = spec
        self.fresh[name] = fresh
        dims = self.dims[name]
        for box in self.saves.get(name, ()):
            part = crop_view(fresh, dims, [(lo - c[0], hi - c[0]) for (lo, hi), c in zip(box, cell)])
            self.store[(name, box)] = part.detach().clone()
        if len(pieces) == 1:
            return fresh
        tensors = [fresh if source < 0 else self.leaves[(name, box)] for source, box in pieces]
        return _assemble(tensors, grid, dims)


def _assemble(tensors: list, grid: tuple, dims: tuple) -> torch.Tensor:
    """Concatenate a raster-ordered grid of pieces (last axis fastest) into one tensor."""
    if len(grid) == 1:
        return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dims[0])
    step = len(tensors) // grid[0]
    rows = [_assemble(tensors[i * step : (i + 1) * step], grid[1:], dims[1:]) for i in range(grid[0])]
    return rows[0] if len(rows) == 1 else torch.cat(rows, dims[0])


@dataclass
class _Kept:
    position: int
    leaf: torch.Tensor
    leaves: dict
    run: TileRun
    blocks: tuple
    values: list = ()  # the statistic values' leaves


@dataclass
class Pass:
    """What one application of :class:`StreamFunction` runs: the tiles of ``shape_plan``
    through ``module`` (None: the trunk's tile code). With global statistics: ``level``, the
    statistics pass (None: the output pass); ``n_values``, how many of the tensors after
    ``run`` are statistic values (constants of the pass); ``call``, the call's shared state
    (``passes.CallState``: random draws, positions, the stripe store); ``fixed``, the indices
    of a statistics pass's outputs that are not differentiable (counts, dtype probes)."""

    shape_plan: Any
    module: Any = None
    level: int | None = None
    n_values: int = 0
    call: Any = None
    fixed: frozenset = frozenset()

    def frees(self, name: str) -> bool:
        """Whether this pass's backward is the last to read node ``name``'s stripes."""
        return self.call is None or self.call.low.get(name) == self.level

    def members(self, trunk) -> frozenset | None:
        """The nodes a statistics pass computes (None: all)."""
        return None if self.level is None else frozenset(trunk.geometry.passes[self.level - 1])


class StreamFunction(torch.autograd.Function):
    """Runs a trunk tile by tile. ``apply(x, trunk, shape_plan, *params)``: the trunk output,
    or a tuple of them when the trunk has several (``trunk.geometry.outputs``). With global
    statistics ``apply(x, trunk, run, *values, *params)`` with a :class:`Pass` ``run``: the
    output pass, or a statistics pass (a tuple of float64 sums).

    ``x`` may live on another device than the trunk (a host-resident image): tiles are
    copied to the trunk's device one at a time, input gradients are assembled next to
    ``x``, and the outputs are assembled on ``trunk.output_device`` (default: the trunk's
    device)."""

    @staticmethod
    def forward(ctx, x, trunk, run, *tensors):
        run = run if isinstance(run, Pass) else Pass(run)
        ctx.trunk, ctx.run, ctx.shape_plan = trunk, run, run.shape_plan
        ctx.image = None if isinstance(x, torch.Tensor) else x  # an array-like: kept as is, no input gradient
        ctx.save_for_backward(*([x] if ctx.image is None else []), *tensors)
        ctx.autocast = AutocastState()
        call = run.call  # with statistics, the draws and positions are the call's
        ctx.random = call.random if call is not None else trunk.random_draws(x)  # None, or the draws tiles replay
        ctx.members = live.snapshot(
            run.module if run.module is not None else trunk.tile
        )  # backward recomputes with these (see live.restored)
        wants_grad = any(ctx.needs_input_grad)
        ctx.positions = call.positions if call is not None else trunk.positions(run.shape_plan)  # or a rank's bands
        output = run.level is None
        keep = ctx.positions[-1] if wants_grad and output else None
        values = tensors[: run.n_values]
        ctx.store, ctx.kept, outs = _run_forward(ctx, x, values, keep, advance=output, keep_store=wants_grad and output)
        if not output:  # a statistics pass: its sums (float64), summed over the ranks of a tile group
            if trunk.tile_group is not None:
                trunk.tile_group.reduce(list(outs))
            ctx.mark_non_differentiable(*(outs[i] for i in run.fixed))
            return outs
        if call is not None:  # the statistics passes' backward reads the output pass's stripes
            call.store = ctx.store
        if trunk.tile_group is not None:  # each rank wrote its blocks into zeros: sum them
            outs = tuple(trunk.tile_group.assemble(out) for out in outs)
        return outs if trunk.multi_output else outs[0]

    @staticmethod
    @first_order  # create_graph=True raises ContractError
    def backward(ctx, *grad_outs):
        # recompute with the members of the forward pass (functional_call may have restored others)
        with live.restored(ctx.members):
            return _backward(ctx, grad_outs)


def _backward(ctx, grad_outs: tuple):
    """The backward pass of :class:`StreamFunction` (see the module docstring)."""
    x, *tensors = ([ctx.image] if ctx.image is not None else []) + list(ctx.saved_tensors)
    trunk, shape_plan, run = ctx.trunk, ctx.shape_plan, ctx.run
    values, params = tensors[: run.n_values], tensors[run.n_values :]
    if run.level is not None:  # a statistics pass reads the output pass's stripes (passes.CallState)
        ctx.store = run.call.store
    if ctx.store is None and trunk.stripes(shape_plan) is None:
        ctx.store = {}
    if ctx.store is None:  # a second backward pass (retain_graph): rebuild the stripes, as in the forward
        with ctx.autocast.restored():
            ctx.store = _run_forward(ctx, x, values, None, advance=False, keep_store=True)[0]
        if run.call is not None and run.level is None:
            run.call.store = ctx.store
    want_x = ctx.needs_input_grad[0]
    needs = ctx.needs_input_grad[3:]
    want_values = needs[: run.n_values]
    wanted = [p for p, need in zip(params, needs[run.n_values :]) if need]
    grad_x = torch.zeros_like(x) if want_x else None
    grads: list = [None] * len(wanted)
    value_grads = [torch.zeros_like(v, dtype=torch.float64) if need else None for v, need in zip(values, want_values)]
    members = run.members(trunk)
    stripes = trunk.stripes(shape_plan)
    store, pending = ctx.store, {}
    device = trunk.compute_device(x)
    kept, ctx.kept = ctx.kept, None
    order = list(reversed(ctx.positions))
    skip = {kept.position} if kept is not None else set()
    loaded = trunk.tiles(x, shape_plan, device, "backward", order, skip)
    with Timer(device) as timer:
        for position, tile, crop in loaded:
            with torch.enable_grad(), ctx.autocast.restored():
                if kept is not None and position == kept.position:
                    leaf, leaves, tile_run, blocks = kept.leaf, kept.leaves, kept.run, kept.blocks
                    value_leaves = kept.values
                    kept = None
                else:
                    with _random_tile(ctx.random, shape_plan, position, advance=False) as random:
                        leaf = crop.requires_grad_(want_x)
                        leaves = _leaves(tile, store, True, members)
                        value_leaves = _value_leaves(values, want_values)
                        tile_run = TileRun(tile, trunk.node_dims, leaves)
                        blocks = _run_tile(trunk, run, trunk.prepare(leaf), tile, tile_run, random, value_leaves)
                if run.level is None:
                    outputs = list(blocks)
                    grad_outputs = [
                        crop_view(grad, dims, box).to(block.device)
                        for grad, dims, box, block in zip(grad_outs, trunk.outputs_dims, tile.blocks, blocks)
                    ]
                else:  # a sum's cotangent reaches every tile's partial unchanged
                    found = [(p, g) for i, (p, g) in enumerate(zip(blocks, grad_outs)) if i not in run.fixed]
                    outputs = [p for p, g in found if p.requires_grad]
                    grad_outputs = [g.to(p.device) for p, g in found if p.requires_grad]
                for name, grad in _pending_grads(pending.pop(position, {}), tile_run, trunk.node_dims):
                    outputs.append(tile_run.fresh[name])
                    grad_outputs.append(grad)
                keys = list(leaves)
                given = [v for v in value_leaves if v is not None and v.requires_grad]
                inputs = ([leaf] if want_x else []) + wanted + given + [leaves[k] for k in keys]
                tile_grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
            del blocks, outputs, grad_outputs, tile_run
            if want_x:
                crop_view(grad_x, trunk.input_dims, tile.region).add_(tile_grads.pop(0).to(grad_x.device))
            for i in range(len(wanted)):
                tg = tile_grads[i]
                if tg is not None:
                    grads[i] = tg if grads[i] is None else grads[i].add_(tg)
            tile_grads = tile_grads[len(wanted) :]
            for acc in (a for a in value_grads if a is not None):  # the values' gradients: sums over tiles
                vg = tile_grads.pop(0)
                if vg is not None:
                    acc.add_(vg.to(acc.device, torch.float64))
            _send(pending, tile, keys, tile_grads)
            if stripes:
                _free(store, leaves, stripes.last_backward, position, run.frees)
    ctx.store = None
    if run.level == 1:  # the last pass backward of the call: the stripes are all read
        run.call.store = None
    trunk.stats.record("backward", len(order), timer.seconds, device)
    if trunk.tile_group is not None:  # each rank back-propagated its own tiles: sum them
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, wanted)]
        trunk.tile_group.reduce(([grad_x] if want_x else []) + grads + [g for g in value_grads if g is not None])
    result = iter(grads)
    param_grads = [next(result) if need else None for need in needs[run.n_values :]]
    value_results = [g.to(v.dtype) if g is not None else None for g, v in zip(value_grads, values)]
    return (grad_x, None, None, *value_results, *param_grads)


def _run_forward(ctx, x, values, keep: int | None, advance: bool, keep_store: bool) -> tuple:
    """Every tile in raster order, without autograd but for tile ``keep``: returns the stripe
    store, the kept tile and the assembled outputs (a tuple); for a statistics pass, the
    tiles' partial sums added in tile order (float64)."""
    trunk, shape_plan, pass_ = ctx.trunk, ctx.shape_plan, ctx.run
    stripes = trunk.stripes(shape_plan)
    device = trunk.compute_device(x)
    store: dict = {}
    outs, kept = None, None
    positions = ctx.positions
    members = pass_.members(trunk)
    phase = "forward" if pass_.level is None else f"forward (statistics pass {pass_.level})"
    tiles = trunk.tiles(x, shape_plan, device, phase, positions)
    with torch.no_grad(), Timer(device) as timer:
        for position, tile, crop in tiles:
            grad = position == keep
            with torch.set_grad_enabled(grad):
                first = position == positions[0]
                with _random_tile(ctx.random, shape_plan, position, advance=advance and first) as random:
                    leaf = crop.requires_grad_(ctx.needs_input_grad[0]) if grad else crop
                    leaves = _leaves(tile, store, grad, members)
                    value_leaves = _value_leaves(values, ctx.needs_input_grad[3:]) if grad else list(values)
                    saves = stripes.saves[position] if stripes else None
                    run = TileRun(tile, trunk.node_dims, leaves, store, saves)
                    blocks = _run_tile(trunk, pass_, trunk.prepare(leaf), tile, run, random, value_leaves)
            if grad:
                kept = _Kept(position, leaf, leaves, run, blocks, value_leaves)
            if stripes and not keep_store:
                _free(store, leaves, stripes.last_forward, position)
            if pass_.level is not None:  # a statistics pass: add the partial sums, in tile order
                outs = tuple(blocks) if outs is None else tuple(a + b for a, b in zip(outs, blocks))
                continue
            if outs is None:  # zeros where other ranks' blocks go
                partial = len(positions) < shape_plan.num_tiles
                outs = tuple(
                    _allocate(block, dims, size, trunk.output_device, partial)
                    for block, dims, size in zip(blocks, trunk.outputs_dims, shape_plan.output_sizes)
                )
            for out, block, dims, box in zip(outs, blocks, trunk.outputs_dims, tile.blocks):
                crop_view(out, dims, box).copy_(block.detach())
    trunk.stats.record("forward", len(positions), timer.seconds, device)
    return (store if keep_store else None), kept, outs


def _leaves(tile, store: dict, grad: bool, members: frozenset | None = None) -> dict:
    """The stripes ``tile`` reads, as leaves (requiring grad when ``grad``); of ``members``
    only, when given (a statistics pass)."""
    leaves = {}
    for name, _, pieces, _ in tile.carry:
        if members is not None and name not in members:
            continue
        for source, box in pieces:
            if source >= 0:
                stored = store[(name, box)]
                leaves[(name, box)] = stored.detach().requires_grad_(grad)
    return leaves


def _send(pending: dict, tile, keys: list, grads: list) -> None:
    """Add the gradients of a tile's stripe leaves to the pending gradients of their cells."""
    sources = {(name, box): source for name, _, pieces, _ in tile.carry for source, box in pieces if source >= 0}
    for key, grad in zip(keys, grads):
        if grad is not None:
            pending.setdefault(sources[key], {}).setdefault(key[0], []).append((key[1], grad))


def _pending_grads(pending: dict, run: TileRun, node_dims: dict) -> Iterator:
    """``(node, gradient of its cell)`` for every cell of this tile that later tiles read."""
    for name, parts in pending.items():
        fresh = run.fresh[name]
        if not fresh.requires_grad:
            continue
        cell = run.specs[name][0]
        grad = torch.zeros_like(fresh)
        for box, part in parts:
            rel = [(lo - c[0], hi - c[0]) for (lo, hi), c in zip(box, cell)]
            crop_view(grad, node_dims[name], rel).add_(part)
        yield name, grad


def _free(store: dict, leaves: dict, last: dict, position: int, frees=None) -> None:
    for key in leaves:
        if last.get(key) == position and (frees is None or frees(key[0])):
            store.pop(key, None)


def _run_tile(trunk, pass_: Pass, x, tile, run: TileRun, random, values) -> tuple:
    """``trunk.run_tile``; with global statistics, through the pass's module with its values."""
    if pass_.call is None:
        return trunk.run_tile(x, tile, run, random)
    return trunk.run_tile(x, tile, run, random, pass_.module, values)


def _value_leaves(values, needs) -> list:
    """The statistic values as one tile's leaves (requiring grad where wanted)."""
    return [v.detach().requires_grad_(bool(need)) for v, need in zip(values, needs)]


@contextlib.contextmanager
def _random_tile(draws, shape_plan, position: int, advance: bool) -> Iterator:
    """The random context of one tile (see ``fxstream.runtime.rng.Draws.tile``), or None."""
    if draws is None:
        yield None
        return
    with draws.tile(shape_plan, position, advance) as random:
        yield random


def _allocate(block: torch.Tensor, dims, size, device=None, zeros: bool = False) -> torch.Tensor:
    shape = list(block.shape)
    for dim, n in zip(dims, size):
        shape[dim] = n
    return block.new_zeros(shape, device=device) if zeros else block.new_empty(shape, device=device)
