"""Tile kernels that torch has no padding-free form of: separable resampling with
explicit taps (the exact global interpolation weights of ``F.interpolate``)."""

from __future__ import annotations

import torch


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
