"""Global statistics: reductions over every pixel, streamed as per-tile partial sums, and the
norm modules decomposed into them (issue 20; ``docs/design-statistics.md``).

A *reducer* is a spatial reduction whose result decomposes into sums over the pixels: each
tile adds up its owned block (the blocks of all tiles partition the map) in float64, the
executor adds the tiles' partial sums, and :meth:`ReductionKind.finish` turns the totals
into what the original op returns. The kinds:

=====================  =================================================  ==========================
kind                   ops                                                partial sums (float64)
=====================  =================================================  ==========================
``sum``                ``torch.sum``, ``.sum`` (every spatial dim)        ``sum a``
``mean``               ``torch.mean``, ``.mean``; ``avg_pool(x, x.shape[2:])``  ``sum a``
``var``                ``var``, ``std``, ``var_mean``, ``std_mean``       ``sum a``, ``sum a^2``
``norm``               ``norm``, ``linalg.vector_norm`` (finite p > 0)    ``sum |a|^p``
``adaptive_avg_pool``  ``AdaptiveAvgPool1-3d``, ``F.adaptive_avg_pool*``  per bin ``sum a``
``moments``            the decomposed norms (below)                       ``sum a``, ``sum a^2``
=====================  =================================================  ==========================

Every partial also returns the number of elements it summed (``count``, per output entry)
and a zero of the dtype the original op returns under the tile's autocast state (the
*dtype probe*: the op evaluated on one pixel), so :meth:`ReductionKind.finish` needs no
shapes: ``n`` is the summed count. Sums of float64 counts are exact below 2**53.

**Decomposed norms.** ``GroupNorm``, ``InstanceNorm`` (with instance statistics) and
``BatchNorm`` in training mode (or without running statistics) are rewritten in the FX graph
(:func:`decompose`) into three parts, each an ordinary node:

    stats = moments(x, spec)             # the reducer: (mean, biased var, count), float64
    rstd = inverse_std(var, eps)         # the statistic head (small tensors); for BatchNorm
                                         # running_rstd also updates the running statistics
    y = normalize(x, mean, rstd, weight, bias, norm)   # the application: local

so the analysis sees a reducer, a head and a pointwise use. Each function also runs on
the whole tensor (the rewritten graph is still the model).

Ops whose values flow back into the trunk are found by the analysis; this module only
knows what each op computes. Imports torch only.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

F64 = torch.float64


class Position(NamedTuple):
    """Where a tile's block lies along one spatial axis: tensor dim ``dim`` holds the global
    pixels ``[lo, hi)`` of ``size``. The tile ABI entry of ``'position'`` slots (adaptive
    pooling bins, broadcast-back taps)."""

    dim: int
    lo: int
    hi: int
    size: int


@dataclass(frozen=True)
class ReductionSpec:
    """What one reducer computes, as plain data.

    ``dims``: the reduced tensor dims (non-negative; of the regrouped tensor when ``groups``
    is set: dim 1 split into ``(groups, C // groups)``). ``spatial``: the input's tensor dim
    of each spatial axis, in axis order. ``bins``: adaptive pooling's output size per axis.
    ``correction``: var/std's. ``p``: norm's. ``root``: std (the square root of var).
    ``pair``: var_mean/std_mean (returns ``(var, mean)``). ``dtype``: sum/mean ``dtype=``."""

    kind: str
    dims: tuple[int, ...]
    spatial: tuple[int, ...]
    keepdim: bool = False
    groups: int = 0
    correction: float = 1.0
    p: float = 2.0
    bins: tuple[int, ...] = ()
    root: bool = False
    pair: bool = False
    dtype: torch.dtype | None = None
    op: str = ""  # how the model spelled it, for messages

    @property
    def reduction(self) -> ReductionKind:
        return KINDS[self.kind]


@dataclass(frozen=True)
class Statistic:
    """Op-table verdict: a reducer (a reduction over every spatial axis that streams as
    partial sums). The analysis decides whether its value flows back into the trunk (a
    statistic) or ends the trunk (a head reduction)."""

    spec: ReductionSpec


@dataclass(frozen=True)
class NormSpec:
    """How :func:`normalize` applies a decomposed norm: ``kind`` 'group', 'instance' or
    'batch'; ``groups`` (GroupNorm), ``op`` the original op's name (for its autocast dtype)."""

    kind: str
    groups: int = 0
    op: str = "group_norm"


@dataclass(frozen=True)
class Decompose:
    """Op-table verdict: a norm with a spatial input, to rewrite into reducer + head +
    application (:func:`decompose`). ``weight``/``bias``/``running`` are attribute paths
    (module form), nodes (functional form) or None; ``running`` is ``(running_mean,
    running_var, num_batches_tracked or None)`` when the running statistics are updated;
    ``module`` the module path whose ``momentum`` is read at call time ('' for functions)."""

    norm: NormSpec
    input: fx.Node
    spec: ReductionSpec
    eps: float
    weight: Any = None
    bias: Any = None
    running: tuple | None = None
    momentum: Any = 0.1
    module: str = ""
    owner: str = ""  # the module whose call this replaces ('' for functions)


@dataclass(frozen=True)
class Refused:
    """Op-table verdict from this module: not streamable, with the reason and the fix."""

    reason: str
    fix: str


# --- reduction kinds ------------------------------------------------------------------------


def _regrouped(a: torch.Tensor, spec: ReductionSpec) -> torch.Tensor:
    if not spec.groups:
        return a
    return a.reshape(a.shape[0], spec.groups, a.shape[1] // spec.groups, *a.shape[2:])


def _count(a: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(float(math.prod(a.shape[d] for d in dims)), dtype=F64, device=a.device)


def _probe(block: torch.Tensor, spec: ReductionSpec) -> torch.Tensor:
    """A zero of the dtype the original op returns on ``block`` (one pixel, same autocast state)."""
    shape = [1 if d in spec.spatial else n for d, n in enumerate(block.shape)]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # var on one pixel: "degrees of freedom <= 0"
        value = whole(block.new_zeros(shape), spec)
    value = value[0] if isinstance(value, tuple) else value
    return torch.zeros((), dtype=value.dtype, device=block.device)


@dataclass(frozen=True)
class ReductionKind:
    """One kind of reducer: a tile's float64 partial sums (:meth:`partial`) and the op's
    result from their totals (:meth:`finish`). ``sums``: how many partial sums besides the
    count."""

    name: str
    sums: int = 1

    def terms(self, a: torch.Tensor, spec: ReductionSpec, position) -> tuple[torch.Tensor, ...]:
        """The float64 sums of ``a`` (regrouped, float64) over ``spec.dims``, and the count."""
        total = a.sum(spec.dims, keepdim=spec.keepdim)
        return (total, _count(a, spec.dims))

    def partial(self, block: torch.Tensor, spec: ReductionSpec, position=None) -> tuple[torch.Tensor, ...]:
        """The tile's partial sums over its owned ``block`` (cast to float64 first, so the
        reduction's own backward also runs in float64), its count, and the dtype probe."""
        a = _regrouped(block, spec).to(F64)
        return (*self.terms(a, spec, position), self.probe(block, spec))

    def probe(self, block: torch.Tensor, spec: ReductionSpec) -> torch.Tensor:
        return _probe(block, spec)

    def finish(self, sums: tuple[torch.Tensor, ...], spec: ReductionSpec) -> Any:
        """The original op's result from the totals (``sums[-2]`` the count, ``sums[-1]`` a
        zero of the result dtype): differentiable torch ops on small tensors."""
        raise NotImplementedError


def _cast(value: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    return value.to(probe.dtype)


class Sum(ReductionKind):
    def finish(self, sums, spec):
        total, _, probe = sums
        return _cast(total, probe)


class Mean(ReductionKind):
    def finish(self, sums, spec):
        total, count, probe = sums
        return _cast(total / count, probe)


class Var(ReductionKind):
    def terms(self, a, spec, position):
        return (
            a.sum(spec.dims, keepdim=spec.keepdim),
            (a * a).sum(spec.dims, keepdim=spec.keepdim),
            _count(a, spec.dims),
        )

    def finish(self, sums, spec):
        s1, s2, n, probe = sums
        # (S2 - S1^2 / n) / (n - correction): exact sums in float64; clamped at 0 as torch's kernels do
        var = torch.clamp_min(s2 - s1 * s1 / n, 0.0) / (n - spec.correction)
        value = torch.sqrt(var) if spec.root else var
        if spec.pair:
            return _cast(value, probe), _cast(s1 / n, probe)
        return _cast(value, probe)


class Norm(ReductionKind):
    def terms(self, a, spec, position):
        power = a * a if spec.p == 2 else a.abs() ** spec.p
        return (power.sum(spec.dims, keepdim=spec.keepdim), _count(a, spec.dims))

    def finish(self, sums, spec):
        total, _, probe = sums
        return _cast(torch.sqrt(total) if spec.p == 2 else total ** (1.0 / spec.p), probe)


class Moments(ReductionKind):
    """The decomposed norms' statistic: ``(mean, biased variance, count)``, kept in float64
    (:func:`normalize` casts them to its compute dtype)."""

    def terms(self, a, spec, position):
        return Var.terms(self, a, spec, position)

    def probe(self, block, spec):
        return torch.zeros((), dtype=F64, device=block.device)  # the values stay float64

    def finish(self, sums, spec):
        s1, s2, n, _ = sums
        mean = s1 / n
        return mean, torch.clamp_min(s2 / n - mean * mean, 0.0), n


class AdaptiveAvgPool(ReductionKind):
    """Adaptive average pooling onto a small grid: each tile adds its block to the bins it
    overlaps (torch's bins ``[floor(i n / b), ceil((i + 1) n / b))``, which overlap where ``b``
    does not divide ``n``), one 0/1 matrix per axis."""

    def terms(self, a, spec, position):
        if all(b == 1 for b in spec.bins):
            total = a.sum(spec.spatial, keepdim=True)
            return (total, _count(a, spec.spatial).reshape((1,) * len(spec.bins)).expand(spec.bins).clone())
        counts = None
        for entry, bins in zip(position, spec.bins):
            matrix = bin_matrix(entry.size, bins, entry.lo, entry.hi).to(a.device)
            a = (a.movedim(entry.dim, -1) @ matrix.T).movedim(-1, entry.dim)
            per_axis = matrix.sum(1)
            counts = per_axis if counts is None else counts[..., None] * per_axis
        return (a, counts)

    def finish(self, sums, spec):
        total, count, probe = sums
        return _cast(total / count, probe)


@functools.lru_cache(maxsize=1024)
def bin_matrix(n: int, bins: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """``(bins, hi - lo)`` float64: 1 where pixel ``lo + j`` of an axis of ``n`` pixels lies in
    adaptive-pooling bin ``i`` (torch's bins)."""
    hi = n if hi is None else hi
    m = torch.zeros(bins, hi - lo, dtype=F64)
    for i in range(bins):
        start, stop = (i * n) // bins, -((-(i + 1) * n) // bins)
        a, b = max(start, lo), min(stop, hi)
        if b > a:
            m[i, a - lo : b - lo] = 1
    return m


KINDS: dict[str, ReductionKind] = {
    k.name: k
    for k in (
        Sum("sum"),
        Mean("mean"),
        Var("var", 2),
        Norm("norm"),
        AdaptiveAvgPool("adaptive_avg_pool"),
        Moments("moments", 2),
    )
}


def partial(block: torch.Tensor, spec: ReductionSpec, position=None) -> tuple[torch.Tensor, ...]:
    """What the tile code calls: ``spec.reduction.partial`` (a plain function for FX)."""
    return spec.reduction.partial(block, spec, position)


def finish(sums: tuple[torch.Tensor, ...], spec: ReductionSpec) -> Any:
    return spec.reduction.finish(tuple(sums), spec)


def whole(a: torch.Tensor, spec: ReductionSpec) -> Any:
    """The reducer's value on a whole tensor, as the original op computes it (the dtype
    probe, and the reference of the tests)."""
    kind = spec.kind
    if kind == "moments":
        return moments(a, spec)
    dims = spec.dims
    if kind in ("sum", "mean"):
        fn = torch.sum if kind == "sum" else torch.mean
        return fn(a, dims, keepdim=spec.keepdim, dtype=spec.dtype)
    if kind == "var":
        fn = {(False, False): torch.var, (True, False): torch.std, (False, True): torch.var_mean}.get(
            (spec.root, spec.pair), torch.std_mean
        )
        return fn(a, dims, correction=spec.correction, keepdim=spec.keepdim)
    if kind == "norm":
        return torch.linalg.vector_norm(a, spec.p, dims, keepdim=spec.keepdim)
    return _ADAPTIVE[len(spec.bins)](a, spec.bins)


_ADAPTIVE = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}


# --- the decomposed norms: reducer, head, application -------------------------------------


def moments(x: torch.Tensor, spec: ReductionSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reducer of a decomposed norm on a whole tensor: ``(mean, biased var, count)`` in
    float64, exactly as the streamed partial sums compute it."""
    kind = KINDS["moments"]
    return kind.finish(kind.partial(x, spec), spec)


def inverse_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """The head of a decomposed norm: ``1 / sqrt(var + eps)`` (float64)."""
    return torch.rsqrt(var + eps)


def running_rstd(
    mean: torch.Tensor,
    var: torch.Tensor,
    count: torch.Tensor,
    eps: float,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    tracked: torch.Tensor | None,
    momentum: Any,
    norm: NormSpec,
) -> torch.Tensor:
    """The head of a decomposed BatchNorm or InstanceNorm that updates its running statistics:
    once per call, from the exact batch statistics, as ``nn.BatchNorm*d.forward`` (and
    ``F.instance_norm``) do, then ``1 / sqrt(var + eps)``.

    ``momentum`` is a number, None (cumulative average: ``1 / num_batches_tracked``) or a
    module whose ``momentum`` is read now. BatchNorm: ``num_batches_tracked += 1``; the running
    variance takes the unbiased variance ``var * n / (n - 1)``. InstanceNorm: the per-instance
    statistics averaged over the batch; ``num_batches_tracked`` is not touched."""
    if isinstance(momentum, nn.Module):
        momentum = momentum.momentum
    with torch.no_grad():
        if tracked is not None:
            tracked.add_(1)
        factor = (1.0 / float(tracked) if tracked is not None else 0.0) if momentum is None else momentum
        unbiased = var * (count / (count - 1))
        m, v = mean.detach(), unbiased.detach()
        if norm.kind == "instance":  # per (n, c): averaged over the batch
            m, v = m.mean(0), v.mean(0)
        if running_mean is not None:
            running_mean.mul_(1 - factor).add_(m.to(running_mean.dtype), alpha=factor)
        if running_var is not None:
            running_var.mul_(1 - factor).add_(v.to(running_var.dtype), alpha=factor)
    return torch.rsqrt(var + eps)


def normalize(
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    norm: NormSpec,
) -> torch.Tensor:
    """The application of a decomposed norm: ``(x - mean) * rstd * weight + bias`` with the
    statistic values as constants; local (each pixel reads its own channels). Computes in
    float32 for half-precision inputs (as torch's norm kernels do) and returns the dtype the
    original op returns under the current autocast state."""
    out_dtype = _norm_dtype(norm.op, x.dtype, x.device.type)
    compute = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    n, c = x.shape[0], x.shape[1]
    rest = (1,) * (x.dim() - 2)
    a = x.to(compute)
    if norm.kind == "batch":  # per channel
        shape = (1, c) + rest
        y = (a - mean.to(compute).view(shape)) * rstd.to(compute).view(shape)
    else:  # per (sample, group); instance: a group per channel
        groups = norm.groups if norm.kind == "group" else c
        g = a.reshape(n, groups, c // groups, *x.shape[2:])
        shape = (n, groups, 1) + rest
        y = ((g - mean.to(compute).view(shape)) * rstd.to(compute).view(shape)).reshape(x.shape)
    channel = (1, c) + rest
    if weight is not None:
        y = y * weight.to(compute).view(channel)
    if bias is not None:
        y = y + bias.to(compute).view(channel)
    return y.to(out_dtype)


_NORM_PROBES = {
    "group_norm": lambda t: F.group_norm(t, 1),
    "instance_norm": lambda t: F.instance_norm(t),
    "batch_norm": lambda t: F.batch_norm(t, None, None, training=True),
}


def _norm_dtype(op: str, dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype ``op`` returns for an input of ``dtype`` under the current autocast state."""
    key = (op, dtype, device_type, _autocast_key(device_type))
    found = _DTYPES.get(key)
    if found is None:
        with torch.no_grad():
            probe = torch.zeros(2, 1, 2, dtype=dtype, device=device_type)
            found = _DTYPES[key] = _NORM_PROBES[op](probe).dtype
    return found


_DTYPES: dict = {}


def _autocast_key(device_type: str) -> tuple:
    try:
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError, RuntimeError):  # older torch, or a device type without autocast
        return (False, None)


# --- the rewrite ------------------------------------------------------------------------------


def decompose(graph: fx.Graph, node: fx.Node, d: Decompose, module_type: str = "") -> list[fx.Node]:
    """Replace ``node`` (a norm) by reducer + head + application nodes inserted before it;
    returns them in graph order (the application last). They keep the node's stack trace,
    and its module in their module stack, so messages still name the module."""
    created: list[fx.Node] = []

    def make(op: str, target: Any, args: tuple = ()) -> fx.Node:
        new = graph.create_node(op, target, args)
        created.append(new)
        return new

    def value(v: Any) -> Any:  # an attribute path (module form), a node or a literal
        return make("get_attr", v) if isinstance(v, str) else v

    with graph.inserting_before(node):
        stats = make("call_function", moments, (d.input, d.spec))
        mean, var, count = (make("call_function", operator.getitem, (stats, i)) for i in range(3))
        if d.running is not None:
            running = tuple(value(v) for v in d.running)
            momentum = make("get_attr", d.module) if d.module else d.momentum
            rstd = make("call_function", running_rstd, (mean, var, count, d.eps, *running, momentum, d.norm))
        else:
            rstd = make("call_function", inverse_std, (var, d.eps))
        weight, bias = value(d.weight), value(d.bias)
        out = make("call_function", normalize, (d.input, mean, rstd, weight, bias, d.norm))
    stack = dict(node.meta.get("nn_module_stack") or {})
    if d.owner:
        stack[d.owner] = (d.owner, module_type)
    for new in created:
        new.meta["stack_trace"] = node.meta.get("stack_trace")
        new.meta["nn_module_stack"] = stack
        new.meta["fxstream_decomposed"] = d.owner or node.name
    node.replace_all_uses_with(out)
    graph.erase_node(node)
    return created


# --- classifying: which ops are reducers or decomposable norms ---------------------------------
#
# ``classify(node, module, layout, ndim, arg)`` returns a Statistic, a Decompose, a Refused or
# None (not this module's business: the op table decides). ``layout`` is the layout of the
# node's first spatial input; ``arg(index, name, default)`` reads an argument.

_SUM_MEAN = {torch.sum: "sum", torch.mean: "mean", "sum": "sum", "mean": "mean"}
_VAR = {
    torch.var: (False, False),
    torch.std: (True, False),
    torch.var_mean: (False, True),
    torch.std_mean: (True, True),
    "var": (False, False),
    "std": (True, False),
}
_NORMS = {torch.norm: ("p", "fro"), "norm": ("p", "fro"), torch.linalg.vector_norm: ("ord", 2)}
_ADAPTIVE_FUNCTIONS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_ADAPTIVE_MODULES = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_INSTANCE_NORMS = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
SYNC_FIX = (
    "call model.eval() before fxstream.compile (running statistics), convert it with "
    "nn.SyncBatchNorm.revert... to a BatchNorm per process, or pass boundary=... to stream only the part before it"
)


def _dims(dim: Any, rank: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(rank))
    if isinstance(dim, int):
        dim = (dim,)
    return tuple(sorted(d % rank for d in dim))


def _covers(layout: tuple, dims: tuple[int, ...], ndim: int) -> bool | None:
    """True when ``dims`` hold every spatial axis, False when some but not all, None when none."""
    axes = {layout[d] for d in dims if layout[d] is not None}
    if not axes:
        return None
    return len(axes) == ndim


def _spatial_dims(layout: tuple, ndim: int) -> tuple[int, ...]:
    return tuple(layout.index(axis) for axis in range(ndim))


def classify(node: fx.Node, module: nn.Module | None, layout: tuple, ndim: int, arg) -> Any:
    """A :class:`Statistic`, :class:`Decompose` or :class:`Refused` for ``node``, or None."""
    if module is not None:
        return _module_rule(node, module, layout, ndim)
    key = node.target if node.op in ("call_function", "call_method") else None
    try:
        if key in _SUM_MEAN:
            return _reduce(_SUM_MEAN[key], layout, ndim, arg, arg(1, "dim"), arg(2, "keepdim", False))
        if key in _VAR:
            return _variance(key, layout, ndim, arg)
        if key in _NORMS:
            return _norm(key, layout, ndim, arg)
        if key in _ADAPTIVE_FUNCTIONS:
            return _adaptive(layout, ndim, arg(1, "output_size"), _ADAPTIVE_FUNCTIONS[key])
        if key is F.group_norm:
            weight, bias, eps = arg(2, "weight", None), arg(3, "bias", None), arg(4, "eps", 1e-5)
            return _group_norm(layout, ndim, arg(0, "input"), arg(1, "num_groups"), weight, bias, eps)
        if key is F.instance_norm:
            return _instance_function(node, layout, ndim, arg)
        if key is F.batch_norm:
            return _batch_function(node, layout, ndim, arg)
    except (TypeError, ValueError):  # malformed arguments: the op table reports them
        return None
    return None


def _reduce(kind, layout, ndim, arg, dim, keepdim, **extra) -> Statistic | None:
    dims = _dims(dim, len(layout))
    if not _covers(layout, dims, ndim):
        return None  # over channels only (local), or over some spatial axes (the table rejects)
    dtype = arg(3, "dtype", None) if kind in ("sum", "mean") else None
    spatial = _spatial_dims(layout, ndim)
    spec = ReductionSpec(kind, dims, spatial, bool(keepdim), dtype=dtype, **extra)
    return Statistic(spec)


def _variance(key, layout, ndim, arg) -> Statistic | None:
    root, pair = _VAR[key]
    second = arg(2, "unbiased", None)
    correction = arg(99, "correction", None)
    if isinstance(second, bool):
        correction = 1.0 if second else 0.0
    elif second is not None:
        correction = second
    unbiased = arg(99, "unbiased", None)
    if correction is None:
        correction = 0.0 if unbiased is False else 1.0
    return _reduce(
        "var",
        layout,
        ndim,
        arg,
        arg(1, "dim"),
        arg(3, "keepdim", False),
        correction=float(correction),
        root=root,
        pair=pair,
    )


def _norm(key, layout, ndim, arg) -> Statistic | None:
    name, default = _NORMS[key]
    p = arg(1, name, default)
    p = 2.0 if p == "fro" else p
    if not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0 or arg(99, "dtype", None) is not None:
        return None
    return _reduce("norm", layout, ndim, arg, arg(2, "dim"), arg(3, "keepdim", False), p=float(p))


def _adaptive(layout, ndim, output_size, dims: int) -> Statistic | None:
    if dims != ndim or layout != (None, None) + tuple(range(ndim)):
        return None
    bins = (output_size,) * ndim if isinstance(output_size, int) else tuple(output_size)
    if len(bins) != ndim or not all(isinstance(b, int) and b > 0 for b in bins):
        return None  # None entries keep an axis: not a reduction over every pixel
    spatial = tuple(range(2, 2 + ndim))
    return Statistic(ReductionSpec("adaptive_avg_pool", spatial, spatial, True, bins=bins))


def whole_map_mean(layout: tuple, ndim: int) -> Statistic | None:
    """``F.avg_pool2d(x, x.shape[2:])``: the mean over every pixel, keeping the dims."""
    if layout != (None, None) + tuple(range(ndim)):
        return None
    spatial = tuple(range(2, 2 + ndim))
    return Statistic(ReductionSpec("mean", spatial, spatial, True))


def _canonical(layout, ndim) -> bool:
    return layout == (None, None) + tuple(range(ndim))


def _moments(layout, ndim, dims, groups: int = 0) -> ReductionSpec:
    return ReductionSpec("moments", dims, _spatial_dims(layout, ndim), False, groups=groups, op="moments")


def _group_norm(layout, ndim, x, groups, weight, bias, eps, owner="") -> Decompose | None:
    if not _canonical(layout, ndim) or not isinstance(groups, int):
        return None
    spec = _moments(layout, ndim, tuple(range(2, 3 + ndim)), groups)
    return Decompose(NormSpec("group", groups, "group_norm"), x, spec, float(eps), weight, bias, owner=owner)


def _affine(module: nn.Module, owner: str) -> tuple:
    weight = f"{owner}.weight" if getattr(module, "weight", None) is not None else None
    bias = f"{owner}.bias" if getattr(module, "bias", None) is not None else None
    return weight, bias


def _module_rule(node, module, layout, ndim) -> Any:
    owner = str(node.target)
    x = node.args[0] if node.args else node.kwargs.get("input")
    if isinstance(module, nn.GroupNorm):
        return _group_norm(layout, ndim, x, module.num_groups, *_affine(module, owner), module.eps, owner)
    if isinstance(module, tuple(_ADAPTIVE_MODULES)):
        return _adaptive(layout, ndim, module.output_size, _ADAPTIVE_MODULES[type(module)])
    if isinstance(module, nn.SyncBatchNorm) and (module.training or module.running_mean is None):
        return Refused(
            "SyncBatchNorm in training mode normalises with statistics over the whole image and every process of "
            "its group; fxstream streams BatchNorm's statistics exactly, but not across processes",
            SYNC_FIX,
        )
    if isinstance(module, _BATCH_NORMS) and (module.training or module.running_mean is None):
        if not _canonical(layout, ndim):
            return None
        spec = _moments(layout, ndim, (0,) + tuple(range(2, 2 + ndim)))
        running = None
        if module.training and module.track_running_stats and module.running_mean is not None:
            running = (f"{owner}.running_mean", f"{owner}.running_var", f"{owner}.num_batches_tracked")
        weight, bias = _affine(module, owner)
        norm = NormSpec("batch", 0, "batch_norm")
        return Decompose(norm, x, spec, float(module.eps), weight, bias, running, None, owner if running else "", owner)
    if isinstance(module, _INSTANCE_NORMS) and (module.training or not module.track_running_stats):
        if not _canonical(layout, ndim):
            return None
        spec = _moments(layout, ndim, tuple(range(2, 2 + ndim)))
        running = None
        if module.training and module.track_running_stats:
            running = (f"{owner}.running_mean", f"{owner}.running_var", None)
        weight, bias = _affine(module, owner)
        norm = NormSpec("instance", 0, "instance_norm")
        return Decompose(norm, x, spec, float(module.eps), weight, bias, running, None, owner if running else "", owner)
    return None


def _instance_function(node, layout, ndim, arg) -> Decompose | None:
    if not _canonical(layout, ndim) or arg(5, "use_input_stats", True) is not True:
        return None
    spec = _moments(layout, ndim, tuple(range(2, 2 + ndim)))
    running = None
    if arg(1, "running_mean", None) is not None or arg(2, "running_var", None) is not None:
        running = (arg(1, "running_mean", None), arg(2, "running_var", None), None)
    norm = NormSpec("instance", 0, "instance_norm")
    weight, bias, momentum, eps = arg(3, "weight"), arg(4, "bias"), arg(6, "momentum", 0.1), arg(7, "eps", 1e-5)
    return Decompose(norm, arg(0, "input"), spec, float(eps), weight, bias, running, momentum)


def _batch_function(node, layout, ndim, arg) -> Decompose | None:
    training = arg(5, "training", False)
    running_mean, running_var = arg(1, "running_mean"), arg(2, "running_var")
    if training is not True and running_mean is not None:
        return None  # eval mode with running statistics: local (the op table)
    if not _canonical(layout, ndim):
        return None
    spec = _moments(layout, ndim, (0,) + tuple(range(2, 2 + ndim)))
    running = (running_mean, running_var, None) if training is True and running_mean is not None else None
    norm = NormSpec("batch", 0, "batch_norm")
    weight, bias, momentum, eps = arg(3, "weight"), arg(4, "bias"), arg(6, "momentum", 0.1), arg(7, "eps", 1e-5)
    return Decompose(norm, arg(0, "input"), spec, float(eps), weight, bias, running, momentum)


def _register_for_codegen(*types: type) -> None:
    """Generated code spells a spec as its repr (``ReductionSpec(kind='mean', ...)``): make the
    class a name every generated module sees, as torch.fx does for ``inf`` and ``device``."""
    register = getattr(fx.graph, "_register_custom_builtin", None)
    if register is None:  # pragma: no cover (every torch fxstream supports has it)
        return
    for cls in types:
        register(cls.__name__, f"from {__name__} import {cls.__name__}", cls)


_register_for_codegen(ReductionSpec, NormSpec, Position)


# The functions the rewritten graph calls, as the op table sees them.
REDUCERS = (moments,)
APPLICATIONS = (normalize,)
HEADS = (inverse_std, running_rstd)


def moments_verdict(node: fx.Node) -> Statistic:
    """The verdict of a ``moments`` node (made by :func:`decompose`)."""
    spec = node.args[1] if len(node.args) > 1 else node.kwargs["spec"]
    return Statistic(spec)
