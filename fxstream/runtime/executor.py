"""The executor: runs the tiles of a :class:`~fxstream.planning.tiling.ShapePlan` under its schedule,
as one differentiable ``autograd.Function``.

Forward (no grad, raster order): each tile runs the generated tile code on its input crop
and writes its block of every trunk output. Under the carry schedule it also stores the
stripes of its cells that later tiles read, and reads the stripes that earlier tiles
stored, through a stripe store (:mod:`fxstream.runtime.stripes`: ``put``/``get``/
``prefetch``/``release``). When gradients are wanted, the last tile runs with autograd and
keeps its graph, so the backward pass does not recompute it.

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

Where the stripes wait for the backward pass is ``Schedule.stripes``, resolved for the
compute device (``Schedule.placement``):

* ``"device"``: the forward pass's store keeps them all on the compute device;
* ``"host"``: it keeps a rolling window on the device and a copy of each in host memory;
  the backward pass prefetches the next tile's stripes while the current one computes;
* ``"banded"``: the tiling's bands share no stripe (``ShapePlan.band_ranges``). The forward
  pass keeps only the last band's stripes; the backward pass visits the bands in reverse
  and first rebuilds each other band's stripes with a no-grad carry over that band
  (:func:`_run_forward` with ``assemble=False``: the same tiles, random draws and autocast
  state, so the same values). Pending gradients never cross a band.

A second backward pass (``retain_graph=True``) finds no store and rebuilds it the same way,
band by band.

The recomputation re-enters the forward pass's autocast state and replays its random
draws, so it computes exactly what the forward pass computed. The order of the backward
pass is fixed, so repeated backward passes are bit-identical.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import first_order
from ..io.transfer import crop as crop_view
from . import live
from . import stripes as stripe_stores
from .progress import Timer
from .settings import AutocastState


class TileRun:
    """The ``carry`` argument of the tile code for one run of one tile.

    The tile code calls ``carry.region(name, fresh)`` after computing a node's cell: it
    records where the gradient of the cells named in ``keep`` enters the graph (for their
    pending gradients), stores the stripes later tiles read (in the forward pass), and
    returns the node's region, assembled from stored stripes and the cell, which the
    consumers' windows crop. It keeps no cell alive: autograd keeps what it saves."""

    def __init__(
        self,
        tile,
        dims: dict,
        leaves: dict,
        store: stripe_stores.DeviceStripes | None = None,
        saves: dict | None = None,
        keep=(),
    ):
        self.specs = {name: (cell, pieces, grid) for name, cell, pieces, grid in tile.carry}
        self.dims = dims
        self.leaves = leaves
        self.store = store
        self.saves = saves or {}
        self.keep = keep
        self.edges: dict = {}  # name -> the GradientEdge of its cell (names in keep that require grad)

    def region(self, name: str, fresh: torch.Tensor) -> torch.Tensor:
        spec = self.specs.get(name)
        if spec is None:
            return fresh
        cell, pieces, grid = spec
        if name in self.keep and fresh.requires_grad:
            self.edges[name] = torch.autograd.graph.get_gradient_edge(fresh)
        dims = self.dims[name]
        for box in self.saves.get(name, ()):
            part = crop_view(fresh, dims, [(lo - c[0], hi - c[0]) for (lo, hi), c in zip(box, cell)])
            self.store.put((name, box), part)
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


class StreamFunction(torch.autograd.Function):
    """Runs a trunk tile by tile. ``apply(x, trunk, shape_plan, *params)``: the trunk output,
    or a tuple of them when the trunk has several (``trunk.geometry.outputs``).

    ``x`` may live on another device than the trunk (a host-resident image): tiles are
    copied to the trunk's device one at a time, input gradients are assembled next to
    ``x``, and the outputs are assembled on ``trunk.output_device`` (default: the trunk's
    device)."""

    @staticmethod
    def forward(ctx, x, trunk, shape_plan, *params):
        ctx.trunk, ctx.shape_plan = trunk, shape_plan
        ctx.image = None if isinstance(x, torch.Tensor) else x  # an array-like: kept as is, no input gradient
        ctx.save_for_backward(*([x] if ctx.image is None else []), *params)
        ctx.autocast = AutocastState()
        ctx.random = trunk.random_draws(x)  # None, or the draws every tile replays
        ctx.members = live.snapshot(trunk.tile)  # backward recomputes with these (see live.restored)
        wants_grad = any(ctx.needs_input_grad)
        ctx.positions = trunk.positions(shape_plan)  # all tiles, or this rank's bands
        schedule = shape_plan.schedule
        ctx.placement = schedule.placement(trunk.compute_device(x).type)  # where the stripes live
        # banded carry back-propagates band by band; the other placements keep every stripe
        ctx.bands = shape_plan.band_ranges(ctx.positions) if schedule.banded else [ctx.positions]
        keep = ctx.positions[-1] if wants_grad else None
        kept = ctx.bands[-1] if wants_grad else None  # the tiles whose stripes the backward pass reads from this pass
        ctx.store, ctx.kept, outs = _run_forward(ctx, x, ctx.positions, keep, kept, advance=True)
        if trunk.tile_group is not None:  # each rank wrote its blocks into zeros: sum them
            outs = tuple(trunk.tile_group.assemble(out) for out in outs)
        return outs if trunk.multi_output else outs[0]

    @staticmethod
    @first_order  # create_graph=True raises ContractError
    def backward(ctx, *grad_outs):
        # recompute with the members of the forward pass (functional_call may have restored others)
        with live.restored(ctx.members):
            return _backward(ctx, grad_outs)


@dataclass
class _Sums:
    """What the backward pass accumulates over the tiles: the input gradient, the wanted
    parameters' gradients, and the pending gradients of cells whose tiles run later."""

    grad_x: torch.Tensor | None
    grads: list
    pending: dict


def _backward(ctx, grad_outs: tuple):
    """The backward pass of :class:`StreamFunction` (see the module docstring): the bands in
    reverse order (one band but under banded carry), each band's tiles in reverse order."""
    x, *params = ([ctx.image] if ctx.image is not None else []) + list(ctx.saved_tensors)
    trunk = ctx.trunk
    want_x = ctx.needs_input_grad[0]
    wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
    sums = _Sums(torch.zeros_like(x) if want_x else None, [None] * len(wanted), {})
    store, ctx.store = ctx.store, None
    kept, ctx.kept = ctx.kept, None
    for band in reversed(ctx.bands):
        if store is None and trunk.stripes(ctx.shape_plan) is not None:
            # a band whose stripes the forward pass did not keep, or a second backward pass
            # (retain_graph): rebuild them with a no-grad carry over the band
            with ctx.autocast.restored():
                store = _run_forward(ctx, x, band, None, band, advance=False, assemble=False)[0]
        _backward_band(ctx, x, band, store, kept, grad_outs, wanted, sums)
        store = kept = None
    if trunk.tile_group is not None:  # each rank back-propagated its own tiles: sum them
        grads = [g if g is not None else torch.zeros_like(p) for g, p in zip(sums.grads, wanted)]
        trunk.tile_group.reduce(([sums.grad_x] if want_x else []) + grads)
        sums.grads = grads
    result = iter(sums.grads)
    param_grads = [next(result) if need else None for need in ctx.needs_input_grad[3:]]
    return (sums.grad_x, None, None, *param_grads)


def _backward_band(ctx, x, band: range, store, kept: _Kept | None, grad_outs: tuple, wanted: list, sums: _Sums):
    """Recompute and back-propagate the tiles of ``band`` in reverse order (``kept``: the
    last tile of the forward pass, with its graph), reading their stripes from ``store``."""
    trunk, shape_plan = ctx.trunk, ctx.shape_plan
    want_x = ctx.needs_input_grad[0]
    device = trunk.compute_device(x)
    order = list(reversed(band))
    skip = {kept.position} if kept is not None else set()
    loaded = trunk.tiles(x, shape_plan, device, "backward", order, skip)
    following = dict(zip(order, order[1:]))  # the tile the backward pass runs after each one
    if store is not None and order and order[0] not in skip:
        store.prefetch(order[0])
    with Timer(device) as timer:
        for position, tile, crop in loaded:
            if store is not None and position in following:
                store.prefetch(following[position])  # host stripes: copied to the device while this tile computes
            with torch.enable_grad(), ctx.autocast.restored():
                parts = sums.pending.pop(position, {})  # complete: every later tile has run
                if kept is not None and position == kept.position:
                    leaf, leaves, run, blocks = kept.leaf, kept.leaves, kept.run, kept.blocks
                    kept = None
                else:
                    with _random_tile(ctx.random, shape_plan, position, advance=False) as random:
                        leaf = crop.requires_grad_(want_x)
                        leaves = _leaves(tile, store, True)
                        run = TileRun(tile, trunk.node_dims, leaves, keep=set(parts))
                        blocks = trunk.run_tile(trunk.prepare(leaf), tile, run, random)
                outputs = list(blocks)
                grad_outputs = [
                    crop_view(grad, dims, box).to(block.device)
                    for grad, dims, box, block in zip(grad_outs, trunk.outputs_dims, tile.blocks, blocks)
                ]
                for edge, grad in _pending_grads(parts, run, trunk.node_dims):
                    outputs.append(edge)
                    grad_outputs.append(grad)
                keys = list(leaves)
                inputs = ([leaf] if want_x else []) + wanted + [leaves[k] for k in keys]
                tile_grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
            del blocks, outputs, grad_outputs, run, parts
            if want_x:
                crop_view(sums.grad_x, trunk.input_dims, tile.region).add_(tile_grads.pop(0).to(sums.grad_x.device))
            for i in range(len(wanted)):
                tg = tile_grads[i]
                if tg is not None:
                    sums.grads[i] = tg if sums.grads[i] is None else sums.grads[i].add_(tg)
            _send(sums.pending, tile, keys, tile_grads[len(wanted) :])
            if store is not None:
                store.release(position, backward=True)
            del tile_grads, leaves, leaf, crop  # not into the next tile's recomputation
    trunk.stats.record("backward", len(order), timer.seconds, device)


def _run_forward(ctx, x, positions: range, keep: int | None, kept: range | None, advance: bool, assemble=True):
    """The tiles at ``positions`` in raster order, without autograd but for tile ``keep``.
    Returns the stripe store (None unless ``kept``: the positions whose stripes the
    backward pass reads from this pass), the kept tile and the assembled outputs (a tuple,
    or None without ``assemble``: a rebuild of the stripes for the backward pass)."""
    trunk, shape_plan = ctx.trunk, ctx.shape_plan
    stripes = trunk.stripes(shape_plan)
    device = trunk.compute_device(x)
    store = stripe_stores.store(ctx.placement, stripes, kept, device) if stripes else None
    outs, kept_tile = None, None
    tiles = trunk.tiles(x, shape_plan, device, "forward", positions)
    with torch.no_grad(), Timer(device) as timer:
        for position, tile, crop in tiles:
            grad = position == keep
            with torch.set_grad_enabled(grad):
                first = position == positions[0]
                with _random_tile(ctx.random, shape_plan, position, advance=advance and first) as random:
                    leaf = crop.requires_grad_(ctx.needs_input_grad[0]) if grad else crop
                    leaves = _leaves(tile, store, grad)
                    saves = stripes.saves[position] if stripes else None
                    read_later = set(saves or ()) if grad else ()  # the kept tile's cells that later tiles read
                    run = TileRun(tile, trunk.node_dims, leaves, store, saves, read_later)
                    blocks = trunk.run_tile(trunk.prepare(leaf), tile, run, random)
            if grad:
                kept_tile = _Kept(position, leaf, leaves, run, blocks)
            if store is not None:
                store.release(position, backward=False)
            if not assemble:
                continue
            if outs is None:  # zeros where other ranks' blocks go
                partial = len(positions) < shape_plan.num_tiles
                outs = tuple(
                    _allocate(block, dims, size, trunk.output_device, partial)
                    for block, dims, size in zip(blocks, trunk.outputs_dims, shape_plan.output_sizes)
                )
            for out, block, dims, box in zip(outs, blocks, trunk.outputs_dims, tile.blocks):
                crop_view(out, dims, box).copy_(block.detach())
    trunk.stats.record("forward" if assemble else "rebuild", len(positions), timer.seconds, device)
    return (store if kept is not None else None), kept_tile, outs


def _leaves(tile, store, grad: bool) -> dict:
    """The stripes ``tile`` reads, as leaves (requiring grad when ``grad``)."""
    leaves = {}
    for name, _, pieces, _ in tile.carry:
        for source, box in pieces:
            if source >= 0:
                leaves[(name, box)] = store.get((name, box)).detach().requires_grad_(grad)
    return leaves


def _send(pending: dict, tile, keys: list, grads: list) -> None:
    """Add the gradients of a tile's stripe leaves to the pending gradients of their cells.

    A stripe leaf's gradient is a view of the gradient of the region it was assembled into
    (``torch.cat``'s backward narrows it): kept as is, it would hold that whole region's
    gradient until the stripe's cell runs, a row of tiles later. Only its own pixels are kept."""
    sources = {(name, box): source for name, _, pieces, _ in tile.carry for source, box in pieces if source >= 0}
    for key, grad in zip(keys, grads):
        if grad is not None:
            pending.setdefault(sources[key], {}).setdefault(key[0], []).append((key[1], _owned(grad)))


def _owned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it when it is a view into a larger storage."""
    return t.clone() if t.untyped_storage().nbytes() > t.numel() * t.element_size() else t


def _pending_grads(pending: dict, run: TileRun, node_dims: dict) -> Iterator:
    """``(gradient edge of a cell, zero)`` for every cell of this tile that later tiles
    read, to add to the outputs of ``autograd.grad``.

    The pending parts are added by a hook when back-propagation reaches the cell, to its
    gradient from this tile; the grad_output is a zero that takes no memory (a broadcast
    scalar). A zero-filled cell per node, given as a grad_output, would live for the whole
    backward pass of the tile, and so would the cell if it were the output."""
    for name, parts in pending.items():
        edge = run.edges.get(name)
        if edge is None:  # the cell does not require grad
            continue
        cell = run.specs[name][0]
        rel = [[(lo - c[0], hi - c[0]) for (lo, hi), c in zip(box, cell)] for box, _ in parts]
        add = functools.partial(_add_parts, edge.output_nr, [p for _, p in parts], rel, node_dims[name])
        edge.node.register_prehook(add)
        meta = edge.node._input_metadata[edge.output_nr]
        yield edge, torch.zeros((), dtype=meta.dtype, device=meta.device).expand(meta.shape)


def _add_parts(index: int, parts: list, boxes: list, dims: tuple, grads: tuple) -> tuple:
    """The gradients flowing into a node, with the pending ``parts`` added at ``boxes`` to
    its output ``index`` (a cell's gradient within its tile). A copy: the engine may pass
    the same gradient tensor to other nodes."""
    grad = grads[index].clone()
    for part, box in zip(parts, boxes):
        crop_view(grad, dims, box).add_(part)
    return grads[:index] + (grad,) + grads[index + 1 :]


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
