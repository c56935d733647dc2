"""What the generated tile code calls besides torch: tile windows (crop, pad at the image
border, gather for reflect/replicate padding), tiled average pooling, separable
resampling with explicit taps (the exact global interpolation weights of ``F.interpolate``),
which torch has no padding-free form of, and the broadcast-back of a global statistic's grid
(the tile's rows of ``F.interpolate(grid, size=whole map)``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..ops import geometry as g
from ..planning.plan import Gather


def resample(x: torch.Tensor, spec: tuple) -> torch.Tensor:
    """Apply ``plan.Resampling`` entries axis by axis: output ``i`` along ``dim`` is
    ``sum_k weight[k][i] * x[index[k][i]]`` (a plain gather for nearest modes).

    Half-precision inputs are interpolated in float32 and rounded once, as torch's
    kernels do.
    """
    dtype = x.dtype
    if dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    for entry in spec:
        taps = [torch.tensor(ix, dtype=torch.long, device=x.device) for ix in entry.index]
        if entry.weight is None:
            x = x.index_select(entry.dim, taps[0])
            continue
        shape = [1] * x.dim()
        shape[entry.dim] = -1
        out = None
        for ix, w in zip(taps, entry.weight):
            term = x.index_select(entry.dim, ix) * torch.tensor(w, dtype=x.dtype, device=x.device).view(shape)
            out = term if out is None else out + term
        x = out
    return x.to(dtype)


def broadcast(grid: torch.Tensor, position: tuple, mode: str, align_corners: bool) -> torch.Tensor:
    """The tile's part of ``F.interpolate(grid, size=<the whole map>, mode=...)``: along each
    axis (``ops.statistics.Position``: the tile's output pixels ``[lo, hi)`` of ``size``), the
    taps of those outputs into the whole grid. ``nearest`` from a grid of size 1 is
    ``grid.expand_as``. Half precision is interpolated in float32 and rounded once."""
    dtype = grid.dtype
    x = grid.float() if dtype in (torch.float16, torch.bfloat16) else grid
    for entry in position:
        bins = x.shape[entry.dim]
        index, weight = g.resample_taps(g.Resample(mode, entry.size / bins, entry.size, align_corners), bins)
        rows = slice(entry.lo, entry.hi)
        taps = [
            torch.tensor([ix[k] for ix in index[rows]], dtype=torch.long, device=x.device) for k in range(len(index[0]))
        ]
        if weight is None:
            x = x.index_select(entry.dim, taps[0])
            continue
        shape = [1] * x.dim()
        shape[entry.dim] = -1
        out = None
        for k, ix in enumerate(taps):
            w = torch.tensor([wt[k] for wt in weight[rows]], dtype=x.dtype, device=x.device).view(shape)
            term = x.index_select(entry.dim, ix) * w
            out = term if out is None else out + term
        x = out
    return x.to(dtype)


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
