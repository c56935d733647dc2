"""Prototype of statistics passes (issue 20): the math of docs/design-statistics.md, checked on toys.

Pure torch; it does not use fxstream's codegen. Every streamed quantity is computed tile by
tile (non-overlapping output blocks, each tile recomputing its halo: the recompute schedule),
and compared with the plain model on the output, every parameter gradient and the input
gradient (and the BatchNorm running statistics).

The orchestration is the one the design proposes: each pass is one ``autograd.Function``

    sums_j = StreamPass(pass j)(x, values of levels < j, params)   # float64 partial sums, added over tiles
    values_j = head_j(sums_j)                                       # plain torch ops on small tensors
    ...
    y = StreamPass(final)(x, all values, params)                    # the ordinary streamed forward

and autograd itself runs the backward passes in the right order: the final pass's backward
gives the parameter/input gradients of ``G`` and the gradients of every value it read; the heads
turn those into the adjoints of the sums; pass ``L``'s backward back-propagates its adjoint
(the same constant for every tile: the gradient of a sum is a broadcast) to the parameters,
the input and the values of lower levels; and so on down to pass 1.

Toy A: conv -> GroupNorm(4) -> ReLU -> conv -> GroupNorm(2) -> ReLU -> squeeze-excitation ->
       pyramid pooling (adaptive avg pool to 1, 2, 3, 6 bins -> 1x1 conv -> ReLU -> bilinear
       upsampling back, cat) -> conv.  Levels: GN1 = 1, GN2 = 2, SE = 3, pyramid = 4.
Toy B: conv -> BatchNorm(train, momentum 0.1) -> ReLU -> conv -> BatchNorm(train, momentum=None)
       -> ReLU -> conv, two steps, running statistics compared after each.

Also: the work of every convolution is counted per pass (output pixels x MACs per pixel), and
compared with the cost model of the design: a node that ``u`` statistic levels depend on runs in
``1 + u`` forward passes and ``1 + u`` backward passes (recompute + back-propagation).

Usage: python benchmarks/stats_prototype.py   (about 10 s on one CPU core)
"""

from __future__ import annotations

import copy
import itertools
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)

Box = tuple[int, int, int, int]  # rows [r0, r1), cols [c0, c1): image pixels (every node here has stride 1)


# --- regions and tile-local ops ---------------------------------------------------------------


def expand(box: Box, m: int, size: tuple[int, int]) -> Box:
    """``box`` grown by ``m`` pixels on every side, clipped to the image."""
    r0, r1, c0, c1 = box
    H, W = size
    return max(r0 - m, 0), min(r1 + m, H), max(c0 - m, 0), min(c1 + m, W)


def crop(t: torch.Tensor, have: Box, want: Box) -> torch.Tensor:
    """The part ``want`` of a tensor that holds the region ``have``."""
    assert have[0] <= want[0] and want[1] <= have[1] and have[2] <= want[2] and want[3] <= have[3], (have, want)
    return t[:, :, want[0] - have[0] : want[1] - have[0], want[2] - have[2] : want[3] - have[2]]


WORK: dict = defaultdict(int)  # (phase, conv) -> MACs computed by the streamed passes
PHASE = [""]
BACKWARD_ORDER: list = []  # the passes' backward calls, in the order autograd ran them


def conv3x3(inp: torch.Tensor, have: Box, out: Box, conv: nn.Conv2d, size) -> torch.Tensor:
    """A padding-1 3x3 convolution computed on the region ``out`` only, from the input region
    ``have``: zero padding only where the window leaves the image (never at a tile edge)."""
    r0, r1, c0, c1 = out
    H, W = size
    need = (r0 - 1, r1 + 1, c0 - 1, c1 + 1)
    inside = (max(need[0], 0), min(need[1], H), max(need[2], 0), min(need[3], W))
    part = crop(inp, have, inside)
    pad = (inside[2] - need[2], need[3] - inside[3], inside[0] - need[0], need[1] - inside[1])
    result = F.conv2d(F.pad(part, pad), conv.weight, conv.bias)
    WORK[(PHASE[0], id(conv))] += result.numel() // result.shape[0] * conv.weight[0].numel()
    return result


# --- toy A: two dependent GroupNorms, squeeze-excitation, a pyramid pooling branch ----------------

BINS = (1, 2, 3, 6)


class ToyA(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.gn2 = nn.GroupNorm(2, 8)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 8)
        self.ppm = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in BINS)
        self.conv3 = nn.Conv2d(8 + 2 * len(BINS), 4, 3, padding=1)
        for gn in (self.gn1, self.gn2):  # non-trivial affine parameters
            nn.init.normal_(gn.weight, 1.0, 0.3)
            nn.init.normal_(gn.bias, 0.0, 0.3)

    def forward(self, x):
        y1 = F.relu(self.gn1(self.conv1(x)))
        y2 = F.relu(self.gn2(self.conv2(y1)))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y2.mean((2, 3))))))
        z = y2 * gate[:, :, None, None]
        size = z.shape[2:]
        ups = [
            F.interpolate(F.relu(conv(F.adaptive_avg_pool2d(z, b))), size=size, mode="bilinear", align_corners=False)
            for b, conv in zip(BINS, self.ppm)
        ]
        return self.conv3(torch.cat([z] + ups, 1))


# The statistic of each level: the tile's partial sums over its own block (float64), and the
# head that turns the summed statistic into the values the next passes apply pointwise.


def group_sums(a: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm's statistic: per (sample, group), the sum and the sum of squares (float64)."""
    g = a.to(torch.float64).reshape(a.shape[0], groups, -1)
    return g.sum(2), (g * g).sum(2)


def group_norm_head(sums, count: int, eps: float, dtype):
    """mean and 1/std per (sample, group) from the summed statistic (biased variance, as GroupNorm)."""
    s1, s2 = sums
    mean = s1 / count
    var = s2 / count - mean * mean
    return mean.to(dtype), torch.rsqrt(var + eps).to(dtype)


def group_norm_apply(a: torch.Tensor, values, gn: nn.GroupNorm) -> torch.Tensor:
    mean, rstd = values
    n, c = a.shape[:2]
    g = a.reshape(n, gn.num_groups, c // gn.num_groups, *a.shape[2:])
    y = ((g - mean[:, :, None, None, None]) * rstd[:, :, None, None, None]).reshape(a.shape)
    return y * gn.weight[None, :, None, None] + gn.bias[None, :, None, None]


def bin_matrix(n: int, bins: int, dtype) -> torch.Tensor:
    """(bins, n): 1 where pixel p lies in adaptive-pooling bin i (bins overlap when bins does not divide n)."""
    m = torch.zeros(bins, n, dtype=dtype)
    for i in range(bins):
        m[i, (i * n) // bins : -((-(i + 1) * n) // bins)] = 1
    return m


def upsample_matrix(bins: int, n: int, dtype) -> torch.Tensor:
    """(bins, n): the linear-interpolation weight of grid cell i at output pixel p (align_corners=False)."""
    eye = torch.eye(bins, dtype=dtype).unsqueeze(0)
    return F.interpolate(eye, size=n, mode="linear", align_corners=False)[0]


@dataclass
class Geometry:
    """What a tile needs besides its crop: the bin and upsampling matrices (per input size)."""

    size: tuple[int, int]
    pool: dict  # bins -> (rows matrix, cols matrix)
    up: dict  # bins -> (rows matrix, cols matrix)

    @staticmethod
    def of(size, dtype) -> Geometry:
        H, W = size
        pool = {b: (bin_matrix(H, b, torch.float64), bin_matrix(W, b, torch.float64)) for b in BINS}
        up = {b: (upsample_matrix(b, H, dtype), upsample_matrix(b, W, dtype)) for b in BINS}
        return Geometry(tuple(size), pool, up)


# Chain of spatial nodes of toy A (x -> a1 -> y1 -> a2 -> y2 -> z -> w -> out); a node made by a
# 3x3 convolution needs a 1-pixel halo of its input. Pass j computes its target's block.
CHAIN_A = (("x", "a1", "y1", "a2", "y2", "z", "w", "out"), {"a1", "a2", "out"})


def margins(target: str, chain) -> dict:
    """Node -> halo (pixels around the tile's block) it must be computed on for ``target``.
    ``chain``: (node names in order, the nodes made by a 3x3 convolution of their predecessor)."""
    names, convs = chain
    result, m = {}, 0
    for name in reversed(names[: names.index(target) + 1]):
        result[name] = m
        m += 1 if name in convs else 0
    return result


def tile_a(model: ToyA, geo: Geometry, x_crop, x_box: Box, block: Box, values: dict, target: str) -> dict:
    """Compute the chain up to ``target`` for the tile whose block is ``block``: node -> (tensor, box).
    ``values``: the statistic values of the lower levels (constants of this pass)."""
    size = geo.size
    box = {name: expand(block, m, size) for name, m in margins(target, CHAIN_A).items()}
    assert box["x"] == x_box
    env = {"x": (x_crop, x_box)}

    def put(name, tensor):
        env[name] = (tensor, box[name])
        return name == target

    if put("a1", conv3x3(x_crop, x_box, box["a1"], model.conv1, size)):
        return env
    a1, _ = env["a1"]
    if put("y1", F.relu(group_norm_apply(a1, values["gn1"], model.gn1))):
        return env
    if put("a2", conv3x3(env["y1"][0], box["y1"], box["a2"], model.conv2, size)):
        return env
    if put("y2", F.relu(group_norm_apply(env["a2"][0], values["gn2"], model.gn2))):
        return env
    if put("z", env["y2"][0] * values["se"][:, :, None, None]):
        return env
    r0, r1, c0, c1 = box["w"]
    ups = []
    for b in BINS:  # the upsampling of a small global grid is local: the tile's rows/cols of the taps
        rows, cols = geo.up[b]
        ups.append(torch.einsum("ih,ncij,jw->nchw", rows[:, r0:r1], values[f"ppm{b}"], cols[:, c0:c1]))
    put("w", torch.cat([env["z"][0]] + ups, 1))
    put("out", conv3x3(env["w"][0], box["w"], box["out"], model.conv3, size))
    return env


def partials_a(model: ToyA, geo: Geometry, env: dict, block: Box, level: int) -> list[torch.Tensor]:
    """A tile's float64 partial sums of the level's statistics, over its own block only (the
    blocks partition the map, so the tiles' partials add up to the whole-image sums)."""
    if level == 1:
        return list(group_sums(crop(*env["a1"], block), model.gn1.num_groups))
    if level == 2:
        return list(group_sums(crop(*env["a2"], block), model.gn2.num_groups))
    if level == 3:
        return [crop(*env["y2"], block).to(torch.float64).sum((2, 3))]
    z = crop(*env["z"], block).to(torch.float64)
    r0, r1, c0, c1 = block
    result = []
    for b in BINS:  # each tile adds to the bins its block overlaps
        rows, cols = geo.pool[b]
        result.append(torch.einsum("ih,nchw,jw->ncij", rows[:, r0:r1], z, cols[:, c0:c1]))
    return result


def heads_a(model: ToyA, geo: Geometry, level: int, sums: list, dtype) -> dict:
    """The statistic heads: plain torch ops on the summed statistics (autograd differentiates them)."""
    H, W = geo.size
    if level == 1:
        c = model.gn1.num_channels // model.gn1.num_groups * H * W
        return {"gn1": group_norm_head(sums, c, model.gn1.eps, dtype)}
    if level == 2:
        c = model.gn2.num_channels // model.gn2.num_groups * H * W
        return {"gn2": group_norm_head(sums, c, model.gn2.eps, dtype)}
    if level == 3:
        mean = (sums[0] / (H * W)).to(dtype)
        return {"se": torch.sigmoid(model.fc2(F.relu(model.fc1(mean))))}
    result = {}
    for b, s, conv in zip(BINS, sums, model.ppm):
        rows, cols = geo.pool[b]
        counts = rows.sum(1)[:, None] * cols.sum(1)[None, :]
        result[f"ppm{b}"] = F.relu(conv((s / counts).to(dtype)))
    return result


# --- the streaming passes -----------------------------------------------------------------------


def split(n: int, block: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + block, n)) for lo in range(0, n, block)]


@dataclass
class Pass:
    """One streaming pass: ``level`` (an int: a statistics pass; 'final': the trunk output)."""

    level: object
    run: object  # (x_crop, x_box, block, values) -> env
    outputs: object  # (env, block) -> list of tensors: partial sums, or [the output block]
    target: str
    blocks: list
    size: tuple
    value_names: tuple  # (key of ``values``, number of tensors) it reads, in the order of the inputs
    chain: tuple = CHAIN_A  # for the halo of the input crop

    def x_box(self, block: Box) -> Box:
        return expand(block, margins(self.target, self.chain)["x"], self.size)


class StreamPass(torch.autograd.Function):
    """``apply(spec, x, n_values, *values, *params)``: the summed partials of a statistics pass,
    or the assembled output of the final pass. Its backward back-propagates the incoming
    gradient tile by tile (reverse order, recomputing each tile with autograd) to the input,
    the values of lower levels and the parameters."""

    @staticmethod
    def forward(ctx, spec: Pass, x, n_values, *tensors):
        ctx.spec, ctx.n_values = spec, n_values
        ctx.save_for_backward(x, *tensors)
        values = dict(zip((k for k, _ in spec.value_names), _unflatten(spec, tensors[:n_values])))
        totals = None
        PHASE[0] = f"forward {spec.level}"
        for block in spec.blocks:
            x_box = spec.x_box(block)
            env = spec.run(crop(x, (0, spec.size[0], 0, spec.size[1]), x_box), x_box, block, values)
            outs = spec.outputs(env, block)
            if spec.level == "final":
                if totals is None:
                    shape = list(outs[0].shape[:2]) + list(spec.size)
                    totals = [outs[0].new_zeros(shape)]
                r0, r1, c0, c1 = block
                totals[0][:, :, r0:r1, c0:c1] = outs[0]
            else:  # the tiles' partial sums, in float64, in a fixed order
                totals = outs if totals is None else [t + o for t, o in zip(totals, outs)]
        return tuple(totals)

    @staticmethod
    def backward(ctx, *grads):
        spec = ctx.spec
        x, *tensors = ctx.saved_tensors
        n_values = ctx.n_values
        value_leaves_all, params = tensors[:n_values], tensors[n_values:]
        grad_x = torch.zeros_like(x) if ctx.needs_input_grad[1] else None
        grad_values = [torch.zeros_like(v, dtype=torch.float64) for v in value_leaves_all]
        grad_params = [torch.zeros_like(p) for p in params]
        PHASE[0] = f"backward {spec.level}"
        BACKWARD_ORDER.append(spec.level)
        for block in reversed(spec.blocks):
            x_box = spec.x_box(block)
            with torch.enable_grad():
                leaf = crop(x, (0, spec.size[0], 0, spec.size[1]), x_box).detach().requires_grad_(grad_x is not None)
                leaves = [v.detach().requires_grad_() for v in value_leaves_all]  # constants of the pass, as leaves
                values = dict(zip((k for k, _ in spec.value_names), _unflatten(spec, leaves)))
                env = spec.run(leaf, x_box, block, values)
                outs = spec.outputs(env, block)
                if spec.level == "final":
                    r0, r1, c0, c1 = block
                    grad_outs = [grads[0][:, :, r0:r1, c0:c1]]
                else:  # a sum's gradient reaches every tile's partial unchanged
                    grad_outs = list(grads)
                inputs = [leaf] + leaves + list(params)
                got = torch.autograd.grad(outs, inputs, grad_outs, allow_unused=True)
            if grad_x is not None and got[0] is not None:
                r0, r1, c0, c1 = x_box
                grad_x[:, :, r0:r1, c0:c1] += got[0]
            for acc, g in zip(grad_values, got[1 : 1 + n_values]):
                if g is not None:
                    acc += g.to(torch.float64)  # the values' adjoints are sums over tiles: add in float64
            for acc, g in zip(grad_params, got[1 + n_values :]):
                if g is not None:
                    acc += g
        grad_values = [g.to(v.dtype) for g, v in zip(grad_values, value_leaves_all)]
        return (None, grad_x, None, *grad_values, *grad_params)


def arities(values: dict) -> tuple:
    return tuple((k, len(v) if isinstance(v, tuple) else 0) for k, v in values.items())


def _flatten(spec: Pass, values: dict) -> list:
    flat = []
    for name, arity in spec.value_names:
        flat += list(values[name]) if arity else [values[name]]
    return flat


def _unflatten(spec: Pass, flat) -> list:
    flat, out = list(flat), []
    for _, arity in spec.value_names:
        out.append(tuple(flat.pop(0) for _ in range(arity)) if arity else flat.pop(0))
    return out


def streamed_a(model: ToyA, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    size = tuple(x.shape[2:])
    geo = Geometry.of(size, x.dtype)
    blocks = [
        (r0, r1, c0, c1) for (r0, r1), (c0, c1) in itertools.product(split(size[0], block[0]), split(size[1], block[1]))
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    targets = {1: "a1", 2: "a2", 3: "y2", 4: "z"}
    values: dict = {}
    for level in (1, 2, 3, 4):
        spec = Pass(
            level,
            lambda xc, xb, b, v, t=targets[level]: tile_a(model, geo, xc, xb, b, v, t),
            lambda env, b, level=level: partials_a(model, geo, env, b, level),
            targets[level],
            blocks,
            size,
            arities(values),
        )
        sums = StreamPass.apply(spec, x, len(_flatten(spec, values)), *_flatten(spec, values), *params)
        values.update(heads_a(model, geo, level, list(sums), x.dtype))
    final = Pass(
        "final",
        lambda xc, xb, b, v: tile_a(model, geo, xc, xb, b, v, "out"),
        lambda env, b: [env["out"][0]],
        "out",
        blocks,
        size,
        arities(values),
    )
    (out,) = StreamPass.apply(final, x, len(_flatten(final, values)), *_flatten(final, values), *params)
    return out


# --- toy B: train-mode BatchNorm with running statistics -------------------------------------------


class ToyB(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6, momentum=0.1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6, momentum=None)  # cumulative moving average: 1 / num_batches_tracked
        self.conv3 = nn.Conv2d(6, 3, 3, padding=1)
        for bn in (self.bn1, self.bn2):
            nn.init.normal_(bn.weight, 1.0, 0.3)
            nn.init.normal_(bn.bias, 0.0, 0.3)

    def forward(self, x):
        return self.conv3(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))


def batch_sums(a: torch.Tensor) -> list[torch.Tensor]:
    """Train-mode BatchNorm's statistic: per channel, the sum and the sum of squares over batch and space."""
    a = a.to(torch.float64)
    return [a.sum((0, 2, 3)), (a * a).sum((0, 2, 3))]


def batch_norm_head(bn: nn.BatchNorm2d, sums, count: int, dtype):
    """mean and 1/std over batch and space, and the running statistics updated once per forward
    call, as ``nn.BatchNorm2d.forward`` does: num_batches_tracked += 1, factor = momentum (or
    1 / num_batches_tracked), running_var from the unbiased variance."""
    s1, s2 = sums
    mean = s1 / count
    var = s2 / count - mean * mean
    if bn.training and bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            unbiased = var * (count / (count - 1))
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return mean.to(dtype), torch.rsqrt(var + bn.eps).to(dtype)


def batch_norm_apply(a, values, bn):
    mean, rstd = values
    y = (a - mean[None, :, None, None]) * rstd[None, :, None, None]
    return y * bn.weight[None, :, None, None] + bn.bias[None, :, None, None]


CHAIN_B = (("x", "a1", "y1", "a2", "y2", "out"), {"a1", "a2", "out"})


def tile_b(model: ToyB, size, x_crop, x_box, block, values, target) -> dict:
    box = {name: expand(block, m, size) for name, m in margins(target, CHAIN_B).items()}
    assert box["x"] == x_box
    env = {"a1": (conv3x3(x_crop, x_box, box["a1"], model.conv1, size), box["a1"])}
    if target == "a1":
        return env
    y1 = F.relu(batch_norm_apply(env["a1"][0], values["bn1"], model.bn1))
    env["a2"] = (conv3x3(y1, box["y1"], box["a2"], model.conv2, size), box["a2"])
    if target == "a2":
        return env
    y2 = F.relu(batch_norm_apply(env["a2"][0], values["bn2"], model.bn2))
    env["out"] = (conv3x3(y2, box["y2"], box["out"], model.conv3, size), box["out"])
    return env


def streamed_b(model: ToyB, x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    size = tuple(x.shape[2:])
    blocks = [
        (r0, r1, c0, c1) for (r0, r1), (c0, c1) in itertools.product(split(size[0], block[0]), split(size[1], block[1]))
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    count = x.shape[0] * size[0] * size[1]
    values: dict = {}
    names = {1: ("a1", "bn1", model.bn1), 2: ("a2", "bn2", model.bn2)}
    for level in (1, 2):
        target, key, bn = names[level]
        spec = Pass(
            level,
            lambda xc, xb, b, v, t=target: tile_b(model, size, xc, xb, b, v, t),
            lambda env, b, t=target: batch_sums(crop(*env[t], b)),
            target,
            blocks,
            size,
            arities(values),
            CHAIN_B,
        )
        sums = StreamPass.apply(spec, x, len(_flatten(spec, values)), *_flatten(spec, values), *params)
        values[key] = batch_norm_head(bn, list(sums), count, x.dtype)
    final = Pass(
        "final",
        lambda xc, xb, b, v: tile_b(model, size, xc, xb, b, v, "out"),
        lambda env, b: [env["out"][0]],
        "out",
        blocks,
        size,
        arities(values),
        CHAIN_B,
    )
    (out,) = StreamPass.apply(final, x, len(_flatten(final, values)), *_flatten(final, values), *params)
    return out


# --- comparison ---------------------------------------------------------------------------------


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def step(model, fn, x, grad_out):
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = fn(model, x)
    out.backward(grad_out)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return out.detach(), grads, x.grad.clone()


def compare(label, plain, streamed, x, grad_out, fn_plain, fn_streamed) -> float:
    out_p, g_p, gx_p = step(plain, fn_plain, x, grad_out)
    out_s, g_s, gx_s = step(streamed, fn_streamed, x, grad_out)
    errors = {"output": rel(out_s, out_p), "input grad": rel(gx_s, gx_p)}
    errors.update({f"grad {n}": rel(g_s[n], g_p[n]) for n in g_p})
    worst = max(errors.values())
    print(f"{label}: worst relative error {worst:.2e}")
    for name, e in errors.items():
        print(f"    {name:<22} {e:.2e}")
    return worst


def work_report(size: tuple[int, int], convs: dict, levels_above: dict) -> None:
    """Per convolution: the passes it ran in and the MACs computed, against the cost model: a node
    that ``u`` statistic levels depend on runs in ``1 + u`` forward passes and ``1 + u`` backward
    passes (recompute + 2x back-propagation), i.e. ``4 (1 + u)`` plain forwards against plain
    ``3``, times the halo overhead ``h`` of the recompute schedule (1 under carry)."""
    print("  work per convolution (recompute schedule: halos included):")
    total_s = total_p = predicted = 0.0
    for name, conv in convs.items():
        plain = conv.weight.numel() * size[0] * size[1]
        mine = {phase: v for (phase, cid), v in WORK.items() if cid == id(conv)}
        fwd = sum(v for phase, v in mine.items() if phase.startswith("forward"))
        bwd = sum(v for phase, v in mine.items() if phase.startswith("backward"))
        n_fwd = sum(phase.startswith("forward") for phase in mine)
        n_bwd = sum(phase.startswith("backward") for phase in mine)
        u = levels_above[name]
        work = (fwd + 3 * bwd) / plain  # a recomputation is followed by a backward of twice its work
        print(
            f"    {name}: u = {u}: ran in {n_fwd} forward and {n_bwd} backward passes (model: {1 + u} and {1 + u}); "
            f"work {work:.2f} plain forwards = 4 * (1 + u) * h with h = {work / (4 * (1 + u)):.2f}"
        )
        total_s += fwd + 3 * bwd
        total_p += 3 * plain
        predicted += 4 * (1 + u) * plain
    print(
        f"  step ratio over the convolutions: measured {total_s / total_p:.2f} (tiny tiles, halo included); "
        f"cost model at h = 1 (carry) {predicted / total_p:.2f}"
    )


def main() -> None:
    torch.manual_seed(0)
    dtype = torch.float64

    # toy A, float64: 23 x 19 image, 7 x 6 blocks (4 x 4 tiles, ragged), batch 2
    model = ToyA().to(dtype)
    x = torch.randn(2, 3, 23, 19, dtype=dtype)
    grad_out = torch.randn(2, 4, 23, 19, dtype=dtype)
    WORK.clear()
    BACKWARD_ORDER.clear()
    worst_a = compare(
        "toy A (2 GroupNorm levels, SE, pyramid pooling 1/2/3/6; 4 levels), float64, 16 tiles",
        model,
        model,
        x,
        grad_out,
        lambda m, x: m(x),
        lambda m, x: streamed_a(m, x, (7, 6)),
    )
    print(f"  backward passes in the order autograd ran them: {BACKWARD_ORDER}")
    convs = {"conv1": model.conv1, "conv2": model.conv2, "conv3": model.conv3}
    work_report((23, 19), convs, {"conv1": 4, "conv2": 3, "conv3": 0})

    # the same at one tile per image (the passes still run): a check of the bookkeeping
    worst_a1 = compare(
        "toy A, float64, 1 tile", model, model, x, grad_out, lambda m, x: m(x), lambda m, x: streamed_a(m, x, (23, 19))
    )

    # toy A, float32 with large activations offsets: the streamed error vs the plain float32 error,
    # both against the float64 plain model (the float64 partial sums keep the variance stable)
    m32 = copy.deepcopy(model).float()
    with torch.no_grad():
        m32.conv1.bias.add_(50.0)  # mean/std of GroupNorm's input ~ 50: a cancellation test
    m64 = copy.deepcopy(m32).double()
    x32 = x.float()
    out64, g64, gx64 = step(m64, lambda m, x: m(x), x32.double(), grad_out)
    out_p, g_p, gx_p = step(m32, lambda m, x: m(x), x32, grad_out.float())
    out_s, g_s, gx_s = step(m32, lambda m, x: streamed_a(m, x, (7, 6)), x32, grad_out.float())

    def err(out, grads, grad_x) -> float:
        errors = [rel(out.double(), out64), rel(grad_x.double(), gx64)]
        return max(errors + [rel(grads[n].double(), g64[n]) for n in g64])

    print(
        f"toy A float32 (GroupNorm input offset by 50): worst relative error vs float64 plain: "
        f"plain float32 {err(out_p, g_p, gx_p):.2e}, streamed float32 {err(out_s, g_s, gx_s):.2e}"
    )

    # toy B: train-mode BatchNorm, two steps, running statistics compared after each
    torch.manual_seed(1)
    plain_b = ToyB().to(dtype)
    stream_b = copy.deepcopy(plain_b)
    worst_b = 0.0
    zeros: dict = {}
    for k in range(2):
        xb = torch.randn(3, 3, 17, 22, dtype=dtype)
        gb = torch.randn(3, 3, 17, 22, dtype=dtype)
        out_p, g_p, gx_p = step(plain_b, lambda m, x: m(x), xb, gb)
        out_s, g_s, gx_s = step(stream_b, lambda m, x: streamed_b(m, x, (5, 8)), xb, gb)
        errors = {"output": rel(out_s, out_p), "input grad": rel(gx_s, gx_p)}
        scale = max(float(g.abs().max()) for g in g_p.values())
        for n in g_p:
            if float(g_p[n].abs().max()) < 1e-12 * scale:  # zero by the math: a bias before train-mode BN
                zeros[n] = (float(g_p[n].abs().max()), float(g_s[n].abs().max()))
                errors[f"grad {n}"] = float((g_s[n] - g_p[n]).abs().max()) / scale
            else:
                errors[f"grad {n}"] = rel(g_s[n], g_p[n])
        for name in ("bn1", "bn2"):
            bp, bs = getattr(plain_b, name), getattr(stream_b, name)
            errors[f"{name}.running_mean"] = rel(bs.running_mean, bp.running_mean)
            errors[f"{name}.running_var"] = rel(bs.running_var, bp.running_var)
            assert int(bs.num_batches_tracked) == int(bp.num_batches_tracked) == k + 1
        worst = max(errors.values())
        worst_b = max(worst_b, worst)
        print(
            f"toy B (train-mode BatchNorm, momentum 0.1 and None; 2 levels), float64, batch 3, 12 tiles, "
            f"step {k + 1}: worst relative error {worst:.2e}; "
            f"num_batches_tracked {int(stream_b.bn1.num_batches_tracked)}"
        )
        for name, e in errors.items():
            print(f"    {name:<22} {e:.2e}")
    for n, (p, q) in zeros.items():
        print(
            f"    ({n}: zero by the math, BatchNorm removes a per-channel shift; max |grad| plain {p:.1e}, "
            f"streamed {q:.1e}; its error is given relative to the largest gradient of the model)"
        )

    assert max(worst_a, worst_a1, worst_b) < 1e-10, "statistics passes are not exact"
    print("all float64 errors below 1e-10")


if __name__ == "__main__":
    main()
