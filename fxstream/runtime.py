"""What the generated code calls at run time: tile windows, tiled average pooling,
and the streaming autograd.Function that runs the tiles.

Forward: every tile runs under ``no_grad`` and writes its block of the trunk output.
Backward: every tile is recomputed with autograd and back-propagated with its own
block of the output gradient. Back-propagation is linear in the output gradient and
the blocks partition it, so the summed tile gradients are the whole-image gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import PlannerError
from .plan import Gather


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


def _crop(t: torch.Tensor, dims: Sequence[int], intervals: Sequence[tuple[int, int]]) -> torch.Tensor:
    for dim, (lo, hi) in zip(dims, intervals):
        t = t.narrow(dim, lo, hi - lo)
    return t


class StreamFunction(torch.autograd.Function):
    """Runs a trunk tile by tile. ``apply(x, trunk, shape_plan, *params)``."""

    @staticmethod
    def forward(ctx, x, trunk, shape_plan, *params):
        ctx.trunk, ctx.shape_plan = trunk, shape_plan
        ctx.save_for_backward(x, *params)
        out = None
        with torch.no_grad():
            for tile in shape_plan.tiles:
                block = trunk.run_tile(_crop(x, trunk.input_dims, tile.region).clone(), tile)
                if out is None:
                    out = _allocate(block, trunk.output_dims, shape_plan.output_size)
                _crop(out, trunk.output_dims, tile.block).copy_(block)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, *params = ctx.saved_tensors
        trunk, shape_plan = ctx.trunk, ctx.shape_plan
        want_x = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:]) if need]
        grad_x = torch.zeros_like(x) if want_x else None
        grads: list = [None] * len(wanted)
        for tile in shape_plan.tiles:
            with torch.enable_grad():
                leaf = _crop(x, trunk.input_dims, tile.region).detach().requires_grad_(want_x)
                block = trunk.run_tile(leaf.clone(), tile)  # clone: in-place ops never touch x
                inputs = ([leaf] if want_x else []) + wanted
                tile_grads = torch.autograd.grad(
                    block, inputs, _crop(grad_out, trunk.output_dims, tile.block), allow_unused=True
                )
            if want_x:
                _crop(grad_x, trunk.input_dims, tile.region).add_(tile_grads[0])
                tile_grads = tile_grads[1:]
            for i, tg in enumerate(tile_grads):
                if tg is not None:
                    grads[i] = tg if grads[i] is None else grads[i].add_(tg)
        result = iter(grads)
        param_grads = [next(result) if need else None for need in ctx.needs_input_grad[3:]]
        return (grad_x, None, None, *param_grads)


def _allocate(block: torch.Tensor, dims: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    shape = list(block.shape)
    for dim, n in zip(dims, size):
        shape[dim] = n
    return block.new_empty(shape)


def check_block(block: torch.Tensor, dims: Sequence[int], tile) -> None:
    expected = tuple(hi - lo for lo, hi in tile.block)
    got = tuple(block.shape[d] for d in dims)
    if got != expected:
        raise PlannerError(f"tile produced a block of size {got}, the plan expected {expected}")
