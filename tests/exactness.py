"""Shared exactness check: streamed vs original on outputs, every parameter gradient
and the input gradient."""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten

import fxstream

# float64: the streamed and whole-image computations differ only in summation order.
RTOL64 = 1e-10
# float32: same, with single-precision rounding over conv sums of O(1e3) terms.
RTOL32 = 1e-4


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """max|a-b| / max|b|; for an all-zero reference, max|a-b|."""
    if a is None and b is None:
        return 0.0
    if a is None:
        a = torch.zeros_like(b)
    if b is None:
        b = torch.zeros_like(a)
    scale = b.abs().max().item()
    diff = (a - b).abs().max().item()
    return diff / scale if scale > 0 else diff


def check_streamed(model, x, tile_size, rtol=None, boundary=None, min_tiles=1, seed=0, streamed=None):
    """Compile ``model``, run both on ``x`` and compare everything. Returns the errors."""
    dtype = x.dtype
    rtol = rtol if rtol is not None else (RTOL64 if dtype == torch.float64 else RTOL32)
    smodel = streamed if streamed is not None else fxstream.compile(model, tile_size=tile_size, boundary=boundary)
    spatial = tuple(x.shape[2:])
    n_tiles = len(smodel.shape_plan(*spatial).tiles)
    # Under carry, a block whose cells would be empty at some node merges into its neighbour,
    # so a forced tiling of a small image can have fewer tiles (test_carry counts carry tiles).
    assert n_tiles >= min_tiles or smodel.schedule.carries, f"expected at least {min_tiles} tiles, plan has {n_tiles}"

    params = [p for p in model.parameters() if p.requires_grad]
    x_ref = x.detach().clone().requires_grad_(True)
    x_str = x.detach().clone().requires_grad_(True)
    # a tensor, or a list/tuple/dict of them (a trunk with several outputs): same structure
    refs, ref_spec = tree_flatten(model(x_ref))
    outs, out_spec = tree_flatten(smodel(x_str))
    assert out_spec == ref_spec, f"output structure {out_spec} != {ref_spec}"
    for out, ref in zip(outs, refs):
        assert out.shape == ref.shape and out.dtype == ref.dtype
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randn(ref.shape, generator=gen, dtype=ref.dtype).to(ref.device) for ref in refs]
    g_ref = torch.autograd.grad(refs, [x_ref] + params, grads, allow_unused=True)
    g_str = torch.autograd.grad(outs, [x_str] + params, grads, allow_unused=True)

    names = ["input"] + [n for n, p in model.named_parameters() if p.requires_grad]
    errors = {
        f"output{i}" if i else "output": rel_err(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, refs))
    }
    errors.update({f"grad:{n}": rel_err(a, b) for n, a, b in zip(names, g_str, g_ref)})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= rtol, f"{worst}: relative error {errors[worst]:.3e} > {rtol:.0e} ({n_tiles} tiles)"
    return errors
