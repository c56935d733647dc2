"""What the generated code calls at run time: tile windows, tiled average pooling,
and the streaming autograd.Function that runs the tiles.

Forward: every tile runs under ``no_grad`` and writes its block of the trunk output.
Backward: every tile is recomputed with autograd and back-propagated with its own
block of the output gradient. Back-propagation is linear in the output gradient and
the blocks partition it, so the summed tile gradients are the whole-image gradients.
When gradients are wanted, the last forward tile runs with autograd and keeps its graph,
so the backward pass does not recompute it (one tile of activations stays alive while
the head runs; backward handles that tile first and frees it).

The recomputation must compute what the forward pass computed: it re-enters the
forward pass's autocast state (:class:`AutocastState`) and replays its random draws
(``fxstream.rng``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import PlannerError
from .plan import Gather
from .progress import StreamStats, Timer
from .transfer import crop as crop_view


def window(t: torch.Tensor, spec: tuple, value: float = 0.0) -> torch.Tensor:
    """Cut from ``t`` (a producer's computed region) exactly what its consumer reads.

    ``spec`` has one entry per spatial axis (see ``plan.Crop`` and ``plan.Gather``):
    a crop, padded with ``value`` where the consumer's window leaves the image, or an
    index gather for reflect/replicate padding at the image border.
    """
    pads = {}
    for entry in spec:
        if isinstance(entry, Gather):
            t = t.index_select(entry.dim, torch.tensor(entry.index, device=t.device))
            continue
        dim, start, stop, pad_lo, pad_hi = entry
        if start != 0 or stop != t.shape[dim]:
            t = t.narrow(dim, start, stop - start)
        if pad_lo or pad_hi:
            pads[dim] = (pad_lo, pad_hi)
    if pads:
        flat = []
        for dim in range(t.dim() - 1, min(pads) - 1, -1):
            flat += list(pads.get(dim, (0, 0)))
        t = F.pad(t, flat, mode="constant", value=value)
    return t


def avg_pool(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    counts: tuple | None = None,
    divisor: int | None = None,
) -> torch.Tensor:
    """Average pooling of a padded window: the window sum divided by the divisor that the
    whole-image op would use at each output position (``counts`` per axis), or by a
    fixed ``divisor`` (``divisor_override``)."""
    ndim = len(kernel)
    total = _sum_pool(x, kernel, stride)
    if divisor is not None:
        return total / divisor
    shape = [1] * total.dim()
    div = None
    for axis, per_axis in enumerate(counts):
        shape_axis = list(shape)
        shape_axis[total.dim() - ndim + axis] = len(per_axis)
        c = torch.tensor(per_axis, dtype=total.dtype, device=total.device).view(shape_axis)
        div = c if div is None else div * c
    return total / div


def _sum_pool(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    ndim = len(kernel)
    if ndim == 2:
        return F.avg_pool2d(x, kernel, stride, 0, False, True, divisor_override=1)
    if ndim == 3:
        return F.avg_pool3d(x, kernel, stride, 0, False, True, divisor_override=1)
    # avg_pool1d has no divisor_override: sum through a 2D pool with a unit axis.
    return F.avg_pool2d(x.unsqueeze(-2), (1, kernel[0]), (1, stride[0]), 0, False, True, divisor_override=1).squeeze(-2)


@dataclass
class StreamSettings:
    """Run-time settings of a StreamedModule's trunk, shared by its compiled programs.

    * ``input_transform(tile, dtype)``: applied to every tile on the compute device
      before the trunk (e.g. :class:`fxstream.Normalize` for ``uint8`` images);
    * ``output_device``: where the trunk output (and its gradient) is assembled; None
      keeps it on the compute device (``"cpu"`` for dense outputs as large as the image);
    * ``progress``: a tqdm bar over the tiles of each pass;
    * ``stats``: what the trunk did since the last reset (:class:`StreamStats`);
    * ``intercept``: when set, ``trunk(x)`` returns ``intercept(trunk, x)`` instead of
      streaming (used by ``serial_backward`` to split a model at its trunk).
    """

    input_transform: Callable | None = None
    output_device: torch.device | None = None
    progress: bool = False
    stats: StreamStats = field(default_factory=StreamStats)
    intercept: Callable | None = None


class AutocastState:
    """The autocast settings of the forward pass, re-entered for the recomputation.

    The autograd engine does not keep the autocast context of the forward pass, so the
    backward recomputation would otherwise run in full precision and produce other
    activations than the forward pass did."""

    DEVICE_TYPES = ("cpu", "cuda")

    def __init__(self) -> None:
        self.states = {d: _autocast_state(d) for d in self.DEVICE_TYPES}

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, (enabled, dtype) in self.states.items():
                if _autocast_state(device_type) != (enabled, dtype):
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:  # torch >= 2.4
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # older torch: per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


class StreamFunction(torch.autograd.Function):
    """Runs a trunk tile by tile. ``apply(x, trunk, shape_plan, *params)``.

    ``x`` may live on another device than the trunk (a host-resident image): tiles are
    copied to the trunk's device one at a time, input gradients are assembled next to
    ``x``, and the output is assembled on ``trunk.output_device`` (default: the trunk's
    device)."""

    @staticmethod
    def forward(ctx, x, trunk, shape_plan, *params):
        ctx.trunk, ctx.shape_plan = trunk, shape_plan
        ctx.image = None if isinstance(x, torch.Tensor) else x  # an array-like: kept as is, no input gradient
        ctx.save_for_backward(*([x] if ctx.image is None else []), *params)
        ctx.autocast = AutocastState()
        ctx.random = trunk.random_draws(x)  # None, or the draws every tile replays
        device = trunk.compute_device(x)
        out = None
        keep = len(shape_plan.tiles) - 1 if any(ctx.needs_input_grad) else None
        ctx.kept = None
        with torch.no_grad(), Timer(device) as timer:
            for index, (tile, crop) in enumerate(trunk.tiles(x, shape_plan, device, "forward")):
                with torch.set_grad_enabled(index == keep):
                    with _random_tile(ctx.random, shape_plan, index, advance=index == 0) as random:
                        leaf = crop.requires_grad_(ctx.needs_input_grad[0]) if index == keep else crop
                        block = trunk.run_tile(trunk.prepare(leaf), tile, random)
                if index == keep:
                    ctx.kept = (index, leaf, block)
                if out is None:
                    out = _allocate(block, trunk.output_dims, shape_plan.output_size, trunk.output_device)
                crop_view(out, trunk.output_dims, tile.block).copy_(block.detach())
        trunk.stats.record("forward", len(shape_plan.tiles), timer.seconds, device)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *params = ([ctx.image] if ctx.image is not None else []) + list(ctx.saved_tensors)
        trunk, shape_plan = ctx.trunk, ctx.shape_plan
        want_x = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        grad_x = torch.zeros_like(x) if want_x else None
        grads: list = [None] * len(wanted)
        device = trunk.compute_device(x)
        kept, ctx.kept = ctx.kept, None
        with Timer(device) as timer:
            for index, tile, crop in _kept_first(kept, shape_plan, trunk.tiles(x, shape_plan, device, "backward")):
                with torch.enable_grad(), ctx.autocast.restored():
                    if kept is not None and index == kept[0]:
                        _, leaf, block = kept  # its graph from the forward pass: no recomputation
                        kept = None
                    else:
                        with _random_tile(ctx.random, shape_plan, index, advance=False) as random:
                            leaf = crop.requires_grad_(want_x)
                            block = trunk.run_tile(trunk.prepare(leaf), tile, random)
                    inputs = ([leaf] if want_x else []) + wanted
                    grad_block = crop_view(grad_out, trunk.output_dims, tile.block).to(block.device)
                    tile_grads = torch.autograd.grad(block, inputs, grad_block, allow_unused=True)
                del block
                if want_x:
                    crop_view(grad_x, trunk.input_dims, tile.region).add_(tile_grads[0].to(grad_x.device))
                    tile_grads = tile_grads[1:]
                for i, tg in enumerate(tile_grads):
                    if tg is not None:
                        grads[i] = tg if grads[i] is None else grads[i].add_(tg)
        trunk.stats.record("backward", len(shape_plan.tiles), timer.seconds, device)
        result = iter(grads)
        param_grads = [next(result) if need else None for need in ctx.needs_input_grad[3:]]
        return (grad_x, None, None, *param_grads)


def _kept_first(kept, shape_plan, loaded: Iterator) -> Iterator:
    """``(index, tile, crop)`` for every tile, the kept tile (if any) first with no crop."""
    if kept is not None:
        yield kept[0], shape_plan.tiles[kept[0]], None
    for index, (tile, crop) in enumerate(loaded):
        if kept is None or index != kept[0]:
            yield index, tile, crop


@contextlib.contextmanager
def _random_tile(draws, shape_plan, index: int, advance: bool) -> Iterator:
    """The random context of one tile (see ``fxstream.rng.Draws.tile``), or None."""
    if draws is None:
        yield None
        return
    with draws.tile(shape_plan, index, advance) as random:
        yield random


def _allocate(block: torch.Tensor, dims: Sequence[int], size: Sequence[int], device=None) -> torch.Tensor:
    shape = list(block.shape)
    for dim, n in zip(dims, size):
        shape[dim] = n
    return block.new_empty(shape, device=device)


def check_block(block: torch.Tensor, dims: Sequence[int], tile) -> None:
    expected = tuple(hi - lo for lo, hi in tile.block)
    got = tuple(block.shape[d] for d in dims)
    if got != expected:
        raise PlannerError(f"tile produced a block of size {got}, the plan expected {expected}")
