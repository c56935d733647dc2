"""The reduction kinds and decomposed norms of ``fxstream.ops.statistics`` (issue 20, step 1).

* every kind: ``finish`` of the partial sums added over a random partition of the map equals
  the op on the whole tensor (values and gradients, float64), bins that overlap included;
* every decomposition equals its module or function (values, every gradient, running
  statistics over three calls);
* the adjoint sums of the design's table equal autograd's VJP w.r.t. the statistic values.
"""

from __future__ import annotations

import copy
import itertools
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from exactness import rel_err

from fxstream.ops import statistics as st
from fxstream.ops.statistics import Position

F64 = torch.float64


def cuts(n: int, pieces: int, gen: torch.Generator) -> list[tuple[int, int]]:
    """``[0, n)`` cut into ``pieces`` random intervals (some may be empty)."""
    inner = sorted(torch.randint(0, n + 1, (pieces - 1,), generator=gen).tolist())
    bounds = [0] + inner + [n]
    return list(zip(bounds, bounds[1:]))


def streamed(x: torch.Tensor, spec: st.ReductionSpec, pieces: int = 4, seed: int = 0):
    """``finish`` of the partial sums of the blocks of a random product partition of ``x``."""
    gen = torch.Generator().manual_seed(seed)
    splits = [cuts(x.shape[d], pieces, gen) for d in spec.spatial]
    totals = None
    for boxes in itertools.product(*splits):
        block = x
        for d, (lo, hi) in zip(spec.spatial, boxes):
            block = block.narrow(d, lo, hi - lo)
        position = tuple(Position(d, lo, hi, x.shape[d]) for d, (lo, hi) in zip(spec.spatial, boxes))
        sums = st.partial(block, spec, position)
        totals = sums if totals is None else tuple(a + b for a, b in zip(totals, sums))
    return st.finish(totals, spec)


def spec_of(kind, dims, spatial=(2, 3), **kw) -> st.ReductionSpec:
    return st.ReductionSpec(kind, tuple(dims), tuple(spatial), **kw)


CASES = {
    "sum": (spec_of("sum", (2, 3)), lambda x: x.sum((2, 3))),
    "sum over batch and space, keepdim": (spec_of("sum", (0, 2, 3), keepdim=True), lambda x: x.sum((0, 2, 3), True)),
    "mean": (spec_of("mean", (2, 3), keepdim=True), lambda x: x.mean((2, 3), keepdim=True)),
    "mean over channels and space": (spec_of("mean", (1, 2, 3)), lambda x: x.mean((1, 2, 3))),
    "mean of everything": (spec_of("mean", (0, 1, 2, 3)), lambda x: x.mean()),
    "var unbiased": (spec_of("var", (2, 3)), lambda x: x.var((2, 3))),
    "var biased keepdim": (
        spec_of("var", (2, 3), keepdim=True, correction=0.0),
        lambda x: x.var((2, 3), correction=0, keepdim=True),
    ),
    "std": (spec_of("var", (2, 3), root=True), lambda x: x.std((2, 3))),
    "var_mean": (spec_of("var", (0, 2, 3), pair=True), lambda x: torch.var_mean(x, (0, 2, 3))),
    "std_mean correction 2": (
        spec_of("var", (2, 3), root=True, pair=True, correction=2.0),
        lambda x: torch.std_mean(x, (2, 3), correction=2),
    ),
    "norm 2": (spec_of("norm", (2, 3), keepdim=True), lambda x: x.norm(dim=(2, 3), keepdim=True)),
    "norm 1": (spec_of("norm", (2, 3), p=1.0), lambda x: x.norm(p=1, dim=(2, 3))),
    "norm 3": (spec_of("norm", (2, 3), p=3.0), lambda x: torch.linalg.vector_norm(x, 3, (2, 3))),
    "adaptive 1": (
        spec_of("adaptive_avg_pool", (2, 3), keepdim=True, bins=(1, 1)),
        lambda x: F.adaptive_avg_pool2d(x, 1),
    ),
    "adaptive 2x3": (
        spec_of("adaptive_avg_pool", (2, 3), keepdim=True, bins=(2, 3)),
        lambda x: F.adaptive_avg_pool2d(x, (2, 3)),
    ),
    "adaptive 6 (overlapping bins)": (
        spec_of("adaptive_avg_pool", (2, 3), keepdim=True, bins=(6, 6)),
        lambda x: F.adaptive_avg_pool2d(x, 6),
    ),
    "adaptive 3 (overlapping bins)": (
        spec_of("adaptive_avg_pool", (2, 3), keepdim=True, bins=(3, 3)),
        lambda x: F.adaptive_avg_pool2d(x, 3),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_partial_sums_over_a_partition_give_the_op(name):
    spec, op = CASES[name]
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(2, 5, 23, 19, generator=gen, dtype=F64) + 0.5).requires_grad_()
    ref, got = op(x), streamed(x, spec, seed=hash(name) % 1000)
    refs = ref if isinstance(ref, tuple) else (ref,)
    gots = got if isinstance(got, tuple) else (got,)
    assert len(gots) == len(refs)
    for a, b in zip(gots, refs):
        assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
        assert rel_err(a.detach(), b.detach()) < 1e-13
    cotangents = [torch.randn(r.shape, generator=gen, dtype=F64) for r in refs]
    g_ref = torch.autograd.grad(refs, x, cotangents)[0]
    g_got = torch.autograd.grad(gots, x, cotangents)[0]
    assert rel_err(g_got, g_ref) < 1e-12
    assert rel_err(st.whole(x, spec)[0] if isinstance(ref, tuple) else st.whole(x, spec), refs[0]) < 1e-13


def test_one_block_and_channels_last():
    """One block (the whole map); a channels-last map (GRN: spatial dims 1, 2)."""
    x = torch.randn(2, 9, 7, 4, dtype=F64)
    spec = spec_of("norm", (1, 2), spatial=(1, 2), keepdim=True)
    assert rel_err(streamed(x, spec, pieces=1), x.norm(p=2, dim=(1, 2), keepdim=True)) < 1e-14
    assert rel_err(streamed(x, spec, pieces=3), x.norm(p=2, dim=(1, 2), keepdim=True)) < 1e-14


def test_bins_against_adaptive_pooling_on_an_arange_map():
    for n in (23, 19, 6, 5, 1):
        for bins in (1, 2, 3, 6, 7):
            ramp = torch.arange(n, dtype=F64)
            expected = F.adaptive_avg_pool1d(ramp.view(1, 1, n), bins).flatten()
            matrix = st.bin_matrix(n, bins)
            assert torch.allclose(matrix @ ramp / matrix.sum(1), expected, rtol=0, atol=1e-12), (n, bins)
            lo, hi = n // 3, n - n // 4
            assert torch.equal(st.bin_matrix(n, bins, lo, hi), matrix[:, lo:hi])


def test_dtype_follows_the_op():
    """float32 input: float32 results (the sums stay float64); ``dtype=`` honoured; bfloat16
    autocast on CPU: the dtype the op returns there."""
    x = torch.randn(2, 3, 8, 6)
    for name in ("mean", "var unbiased", "norm 2", "adaptive 6 (overlapping bins)"):
        spec, op = CASES[name]
        assert streamed(x, spec).dtype == op(x).dtype == torch.float32
    spec = spec_of("sum", (2, 3), dtype=F64)
    assert streamed(x, spec).dtype == F64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = x.bfloat16()
        for name in ("mean", "sum"):
            spec, op = CASES[name]
            assert streamed(y, spec).dtype == op(y).dtype


# --- the decomposed norms ---------------------------------------------------------------------


def grad_err(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    """Relative error, or, for a gradient that is zero by the math (a convolution bias before
    an InstanceNorm or a train-mode BatchNorm, which remove per-channel shifts), the
    difference relative to the largest gradient of the model (both sides are rounding noise)."""
    if float(b.abs().max()) < 1e-9 * scale:
        return float((a - b).abs().max()) / scale
    return rel_err(a, b)


def arg_reader(node: fx.Node):
    return lambda i, name, default=None: node.args[i] if i < len(node.args) else node.kwargs.get(name, default)


def decomposed(model: nn.Module) -> fx.GraphModule:
    """``model`` traced, with every norm decomposed by ``statistics.decompose``."""
    gm = fx.symbolic_trace(model)
    layout = (None, None, 0, 1)
    found = 0
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if node.op not in ("call_module", "call_function"):
            continue
        verdict = st.classify(node, module, layout, 2, arg_reader(node))
        if isinstance(verdict, st.Decompose):
            st.decompose(gm.graph, node, verdict, type(module).__name__ if module is not None else "")
            found += 1
    assert found, "nothing decomposed"
    gm.graph.lint()
    gm.recompile()
    assert not any(
        n.op == "call_module" and "norm" in type(gm.get_submodule(n.target)).__name__.lower() for n in gm.graph.nodes
    )
    return gm


class Functional(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(torch.randn(6))
        self.bias = nn.Parameter(torch.randn(6))
        self.register_buffer("running_mean", torch.zeros(6))
        self.register_buffer("running_var", torch.ones(6))

    def forward(self, x):
        if self.kind == "group":
            return F.group_norm(x, 3, self.weight, self.bias, 1e-4)
        if self.kind == "batch":
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.2, 1e-3)
        return F.instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, 0.3)


def _norms():
    def affine(m):
        if getattr(m, "weight", None) is not None:
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
        return m

    return {
        "GroupNorm": lambda: affine(nn.GroupNorm(3, 6)),
        "GroupNorm without affine": lambda: nn.GroupNorm(2, 6, affine=False),
        "GroupNorm one group": lambda: affine(nn.GroupNorm(1, 6)),
        "InstanceNorm": lambda: nn.InstanceNorm2d(6),
        "InstanceNorm affine": lambda: affine(nn.InstanceNorm2d(6, affine=True)),
        "InstanceNorm tracked, train": lambda: affine(nn.InstanceNorm2d(6, affine=True, track_running_stats=True)),
        "BatchNorm train": lambda: affine(nn.BatchNorm2d(6)),
        "BatchNorm train momentum None": lambda: affine(nn.BatchNorm2d(6, momentum=None)),
        "BatchNorm untracked": lambda: affine(nn.BatchNorm2d(6, track_running_stats=False)),
        "BatchNorm untracked, eval": lambda: affine(nn.BatchNorm2d(6, track_running_stats=False)).eval(),
        "F.group_norm": lambda: Functional("group"),
        "F.batch_norm training": lambda: Functional("batch"),
        "F.instance_norm with running statistics": lambda: Functional("instance"),
    }


NORMS = _norms()


@pytest.mark.parametrize("name", list(NORMS))
def test_decomposition_equals_the_module(name):
    torch.manual_seed(0)
    norm = NORMS[name]().double()
    plain = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm).double()
    plain.train(norm.training)
    model = copy.deepcopy(plain)
    gm = decomposed(model)
    params = list(model.parameters())
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(3, 3, 9, 7, generator=gen, dtype=F64) + step
        x_p, x_s = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref, got = plain(x_p), gm(x_s)
        assert got.dtype == ref.dtype and rel_err(got, ref) < 1e-12, f"step {step}: output"
        grad = torch.randn(ref.shape, generator=gen, dtype=F64)
        g_ref = torch.autograd.grad(ref, [x_p] + list(plain.parameters()), grad)
        g_got = torch.autograd.grad(got, [x_s] + params, grad)
        scale = max(float(g.abs().max()) for g in g_ref)
        for (n, _), a, b in zip([("input", None)] + list(plain.named_parameters()), g_got, g_ref):
            assert grad_err(a, b, scale) < 1e-10, f"step {step}: grad {n}"
        for (n, b_ref), (_, b_got) in zip(plain.named_buffers(), model.named_buffers()):
            if b_ref.is_floating_point():
                assert rel_err(b_got, b_ref) < 1e-13, f"step {step}: buffer {n}"
            else:
                assert torch.equal(b_got, b_ref), f"step {step}: buffer {n}"


def test_running_statistics_over_three_calls():
    """The update equals nn.BatchNorm2d's over three calls, for momentum 0.1 and None."""
    for momentum in (0.1, None):
        bn = nn.BatchNorm2d(4, momentum=momentum).double()
        mine = copy.deepcopy(bn)
        spec = spec_of("moments", (0, 2, 3))
        norm = st.NormSpec("batch", 0, "batch_norm")
        for call in range(3):
            x = torch.randn(2, 4, 5, 3, dtype=F64) * (call + 1) + call
            bn(x)
            mean, var, count = st.moments(x, spec)
            st.running_rstd(
                mean, var, count, bn.eps, mine.running_mean, mine.running_var, mine.num_batches_tracked, mine, norm
            )
            assert int(mine.num_batches_tracked) == int(bn.num_batches_tracked) == call + 1
            assert rel_err(mine.running_mean, bn.running_mean) < 1e-14
            assert rel_err(mine.running_var, bn.running_var) < 1e-14


def test_normalize_dtypes_under_autocast():
    """bfloat16 autocast on CPU: the decomposed norm returns the dtype the module returns."""
    gm_source = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.GroupNorm(3, 6))
    gm = decomposed(copy.deepcopy(gm_source))
    x = torch.randn(1, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gm(x).dtype == gm_source(x).dtype
        assert gm(x.bfloat16()).dtype == gm_source(x.bfloat16()).dtype
    assert rel_err(gm(x), gm_source(x)) < 1e-5


def test_sync_batch_norm_in_training_is_refused():
    gm = fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)))
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "1")
    verdict = st.classify(node, gm.get_submodule("1"), (None, None, 0, 1), 2, arg_reader(node))
    assert isinstance(verdict, st.Refused) and "SyncBatchNorm" in verdict.reason and "eval" in verdict.fix


# --- the adjoint sums of the design's table (test oracles: autograd computes them) --------------


def value_grads(apply, x, values, g):
    """Autograd's VJP of ``apply(x, *values)`` with cotangent ``g`` w.r.t. the values."""
    leaves = [v.detach().requires_grad_() for v in values]
    return torch.autograd.grad(apply(x, *leaves), leaves, g)


def test_adjoint_sums_equal_autograd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 7, 5, generator=gen, dtype=F64)
    g = torch.randn(2, 6, 7, 5, generator=gen, dtype=F64)
    w, b = torch.randn(6, generator=gen, dtype=F64), torch.randn(6, generator=gen, dtype=F64)
    # GroupNorm: c_mu = -sum(g w) r, c_r = sum(g w (x - mu)) per (n, group)
    norm = st.NormSpec("group", 3, "group_norm")
    mean, var, _ = st.moments(x, spec_of("moments", (2, 3, 4), groups=3))
    rstd = st.inverse_std(var, 1e-5)
    c_mu, c_r = value_grads(lambda x, m, r: st.normalize(x, m, r, w, b, norm), x, (mean, rstd), g)
    gw = (g * w.view(1, 6, 1, 1)).reshape(2, 3, 2, 7, 5)
    xg = x.reshape(2, 3, 2, 7, 5)
    assert rel_err(c_mu, -gw.sum((2, 3, 4)) * rstd) < 1e-13
    assert rel_err(c_r, (gw * (xg - mean.view(2, 3, 1, 1, 1))).sum((2, 3, 4))) < 1e-13
    # squeeze-excitation: y = x * s, c_s = sum(x g) per (n, c)
    s = torch.rand(2, 6, 1, 1, generator=gen, dtype=F64)
    (c_s,) = value_grads(operator.mul, x, (s,), g)
    assert rel_err(c_s, (x * g).sum((2, 3), keepdim=True)) < 1e-13
    # global mean broadcast: y = x - m, c_m = -sum(g)
    (c_m,) = value_grads(operator.sub, x, (x.mean((2, 3), keepdim=True),), g)
    assert rel_err(c_m, -g.sum((2, 3), keepdim=True)) < 1e-13
    # GRN: y = gamma * (x * N) + beta + x, c_N = sum(gamma x g)
    gamma = torch.randn(1, 6, 1, 1, generator=gen, dtype=F64)
    nx = torch.rand(2, 6, 1, 1, generator=gen, dtype=F64)
    (c_n,) = value_grads(lambda x, n: torch.addcmul(b.view(1, 6, 1, 1), gamma, x * n) + x, x, (nx,), g)
    assert rel_err(c_n, (gamma * x * g).sum((2, 3), keepdim=True)) < 1e-13
    # pooling branch: u = upsample(P), c_P[i, j] = sum_p U[i, p] g(p) (the transposed taps)
    grid = torch.randn(2, 6, 3, 2, generator=gen, dtype=F64)
    up = lambda x, p: F.interpolate(p, size=(7, 5), mode="bilinear", align_corners=False) + x  # noqa: E731
    (c_p,) = value_grads(up, x, (grid,), g)
    rows = F.interpolate(torch.eye(3, dtype=F64)[None], size=7, mode="linear")[0]  # (3, 7): U[i, p]
    cols = F.interpolate(torch.eye(2, dtype=F64)[None], size=5, mode="linear")[0]
    assert rel_err(c_p, torch.einsum("ih,nchw,jw->ncij", rows, g, cols)) < 1e-13
