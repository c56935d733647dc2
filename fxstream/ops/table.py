"""The op table: what fxstream knows about each op it may meet in a trunk.

Each entry classifies one FX node, given the layouts of its spatial inputs, as

* :class:`Local`     - output pixel depends only on the same pixel of its inputs
                       (activations, arithmetic, eval BatchNorm, channel LayerNorm...);
* :class:`Window`    - a sliding window read through a :class:`~fxstream.ops.geometry.Stencil`
                       (convolution, pooling, padding);
* :class:`Reduction` - the output depends on the whole image (global/adaptive pooling,
                       flatten): a valid trunk boundary, never inside the trunk;
* ``statistics.Statistic`` - a reduction over every pixel that streams as per-tile partial
                       sums (mean, sum, var, norm, adaptive average pooling): a trunk
                       boundary, or a statistic read back by the trunk (``ops/statistics.py``);
* ``statistics.Decompose`` - a norm (GroupNorm, InstanceNorm, train-mode BatchNorm) that the
                       analysis rewrites into a statistic and a local application;
* :class:`Rejected`  - not streamable here, with the reason and the fix (:class:`Unknown`:
                       an op the table does not know).

A *layout* is a tuple with one entry per tensor dim: the spatial axis it holds
(0, 1, ...) or ``None`` for batch/channel dims. NCHW is ``(None, None, 0, 1)``;
after ``permute(0, 2, 3, 1)`` it is ``(None, 0, 1, None)``.

Supporting a new op means adding one row here and one model to the test zoo.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import channel_ops, statistics
from .geometry import Resample, Shuffle, Stencil, Transposed

Layout = tuple[int | None, ...]


@dataclass(frozen=True)
class Local:
    layout: Layout


@dataclass(frozen=True)
class Window:
    """A window op: 'conv', 'max_pool', 'avg_pool', 'pad', 'slice', 'conv_transpose', 'shuffle',
    'unshuffle', 'space_to_depth' or 'resample'. ``stencils`` holds one axis op per spatial axis."""

    kind: str
    input: fx.Node
    stencils: tuple
    fill: str = "constant"  # border fill: 'constant', 'reflect' or 'replicate'
    value: float = 0.0  # constant fill value
    params: dict = field(default_factory=dict)
    layout: Layout | None = None  # the output's layout where it differs from the input's


@dataclass(frozen=True)
class Reduction:
    pass


@dataclass(frozen=True)
class Rejected:
    reason: str
    fix: str


@dataclass(frozen=True)
class Unknown(Rejected):
    """An op the table does not know: rejected, but the analysis may look past it (assuming
    it local) for a non-local op further on, to name that one too."""


Verdict = Any  # Local | Window | Reduction | Rejected

EVAL_FIX = "call model.eval() before fxstream.compile, or pass boundary=... to stream only the part before it"
BOUNDARY_FIX = "pass boundary=<last node or module to stream> to stream only the part before it"


@dataclass
class OpContext:
    """What a classifier sees: the node, its module (for call_module) and input layouts."""

    node: fx.Node
    module: nn.Module | None
    layouts: dict  # fx.Node -> Layout, for spatial nodes
    ndim: int
    # Dynamic ops (arguments computed from spatial sizes): ``pending`` at analysis time, when
    # only the kind of window is decided; per input size the planner passes the values of the
    # size nodes and the spatial size of every spatial node, and the stencils follow.
    pending: bool = False
    values: dict | None = None  # fx.Node -> evaluated value
    sizes: dict | None = None  # fx.Node -> spatial size tuple

    def arg(self, index: int, name: str, default: Any = None) -> Any:
        if index < len(self.node.args):
            value = self.node.args[index]
        else:
            value = self.node.kwargs.get(name, default)
        if self.values:
            value = fx.node.map_arg(value, lambda n: self.values.get(n, n))
        return value

    def spatial_inputs(self) -> list[fx.Node]:
        return [n for n in self.node.all_input_nodes if n in self.layouts]

    @property
    def layout(self) -> Layout:
        return self.layouts[self.spatial_inputs()[0]]


def _canonical(ndim: int) -> Layout:
    return (None, None) + tuple(range(ndim))


def _dims(dim: Any, rank: int) -> list[int]:
    if dim is None:
        return list(range(rank))
    if isinstance(dim, int):
        dim = [dim]
    return [d % rank for d in dim]


def _spatial_dims(layout: Layout, dims: list[int]) -> bool:
    return any(layout[d] is not None for d in dims)


# --- Local ops -------------------------------------------------------------------


def pointwise(ctx: OpContext) -> Verdict:
    layouts = {ctx.layouts[n] for n in ctx.spatial_inputs()}
    if len(layouts) > 1:
        return Rejected("its spatial inputs have different dimension orders", "permute them to the same order")
    return Local(ctx.layout)


def attribute(ctx: OpContext) -> Verdict:
    """``x.data``: the same pixels, detached (MONAI ResNet's shortcut); other attributes are
    unknown (size queries and ``x.dtype`` never reach the table)."""
    name = ctx.node.args[1]
    if name == "data":
        return Local(ctx.layout)
    return Unknown(f"fxstream does not know whether attribute Tensor.{name} is local", BOUNDARY_FIX)


def over_dim(position: int, name: str, default: Any = None) -> Callable[[OpContext], Verdict]:
    """Local when the op works along a non-spatial dim (softmax over channels, cat...)."""

    def classify(ctx: OpContext) -> Verdict:
        dim = ctx.arg(position, name, default)
        if dim is None or _spatial_dims(ctx.layout, _dims(dim, len(ctx.layout))):
            return Rejected(f"it works along a spatial dimension ({name}={dim})", BOUNDARY_FIX)
        return pointwise(ctx)

    return classify


def stack(ctx: OpContext) -> Verdict:
    """``torch.stack(tensors, dim)``: a new batch/channel dim at ``dim`` (a reduction over it,
    as in a selective-kernel or FPN merge, is then a channel reduction)."""
    verdict = pointwise(ctx)
    if isinstance(verdict, Rejected):
        return verdict
    dim = ctx.arg(1, "dim", 0) % (len(verdict.layout) + 1)
    return Local(verdict.layout[:dim] + (None,) + verdict.layout[dim:])


def over_last(count: Callable[[OpContext], int], what: str) -> Callable[[OpContext], Verdict]:
    """Local when the op only mixes the last ``count`` dims and none is spatial."""

    def classify(ctx: OpContext) -> Verdict:
        n = count(ctx)
        if _spatial_dims(ctx.layout, list(range(len(ctx.layout) - n, len(ctx.layout)))):
            return Rejected(
                f"{what} runs over spatial dimensions, so each pixel depends on the whole image",
                "normalise over channels only (permute channels last first, as ConvNeXt does), or " + BOUNDARY_FIX,
            )
        return Local(ctx.layout)

    return classify


def channel_op(ctx: OpContext) -> Verdict:
    """Per-channel ops on dim 1 (BatchNorm, PReLU, LocalResponseNorm)."""
    if ctx.layout[1] is not None:
        return Rejected("dim 1 holds a spatial axis, not channels", "keep channels in dim 1")
    return Local(ctx.layout)


def batch_norm_module(ctx: OpContext) -> Verdict:
    m = ctx.module
    if m.training:
        return Rejected("BatchNorm in training mode normalises with whole-image batch statistics", EVAL_FIX)
    if m.running_mean is None:
        return Rejected(
            "BatchNorm without running statistics (track_running_stats=False) normalises with "
            "whole-image batch statistics even in eval mode",
            "use track_running_stats=True, or " + BOUNDARY_FIX,
        )
    return channel_op(ctx)


def batch_norm_function(ctx: OpContext) -> Verdict:
    training = ctx.arg(5, "training", False)
    if training is not False or ctx.arg(1, "running_mean") is None:
        return Rejected("F.batch_norm with training=True uses whole-image batch statistics", EVAL_FIX)
    return channel_op(ctx)


def dropout(training_index: int, p_index: int, keyed: bool = True) -> Callable[[OpContext], Verdict]:
    """Dropout and stochastic depth: local. In training mode the tile code draws their
    masks by global position (``fxstream.runtime.rng``), so every tile and the backward
    recomputation see the same draws; alpha dropout is not keyed and is rejected."""

    def classify(ctx: OpContext) -> Verdict:
        if ctx.module is not None:
            training, p = ctx.module.training, ctx.module.p
        else:
            training = ctx.arg(training_index, "training", True)
            p = ctx.arg(p_index, "p", 0.5)
        if training and p != 0 and not keyed:
            return Rejected(
                "alpha dropout in training mode draws random masks that fxstream does not replay per tile",
                EVAL_FIX,
            )
        return Local(ctx.layout)

    return classify


def permute(ctx: OpContext) -> Verdict:
    dims = ctx.node.args[1:] if ctx.node.op == "call_method" else (ctx.arg(1, "dims"),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    layout = ctx.layout
    dims = _dims(list(dims), len(layout))
    return Local(tuple(layout[d] for d in dims))


def transpose(ctx: OpContext) -> Verdict:
    layout = list(ctx.layout)
    d0, d1 = _dims([ctx.arg(1, "dim0"), ctx.arg(2, "dim1")], len(layout))
    layout[d0], layout[d1] = layout[d1], layout[d0]
    return Local(tuple(layout))


def flatten(start_index: int, default_start: int) -> Callable[[OpContext], Verdict]:
    def classify(ctx: OpContext) -> Verdict:
        if ctx.module is not None:
            start, end = ctx.module.start_dim, ctx.module.end_dim
        else:
            start = ctx.arg(start_index, "start_dim", default_start)
            end = ctx.arg(start_index + 1, "end_dim", -1)
        layout = ctx.layout
        start, end = _dims([start, end], len(layout))
        if _spatial_dims(layout, list(range(start, end + 1))):
            return Reduction()
        return Local(layout[:start] + (None,) + layout[end + 1 :])

    return classify


def unflatten(ctx: OpContext) -> Verdict:
    """``x.unflatten(dim, sizes)``: local when ``dim`` is a batch/channel dim."""
    layout = ctx.layout
    dim = _dims(ctx.arg(1, "dim"), len(layout))[0]
    if layout[dim] is not None:
        return Rejected(f"it unflattens spatial dim {dim}, mixing pixels into channels", BOUNDARY_FIX)
    return Local(layout[:dim] + (None,) * len(ctx.arg(2, "sizes")) + layout[dim + 1 :])


def repeat(ctx: OpContext) -> Verdict:
    """``x.repeat(sizes)``: tiles ``x`` along each dim; local when every spatial dim is
    repeated once (``x.repeat(1, n, 1, 1)`` in MONAI's VNet). Extra leading sizes add
    leading batch/channel dims."""
    sizes = ctx.node.args[1:]
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    if not sizes:
        sizes = tuple(ctx.node.kwargs.get("repeats", ()))
    layout = ctx.layout
    if len(sizes) < len(layout):
        return Rejected(f"repeat with {len(sizes)} sizes for a {len(layout)}-dim tensor", "give one size per dim")
    layout = (None,) * (len(sizes) - len(layout)) + layout
    spatial = [s for s, axis in zip(sizes, layout) if axis is not None]
    if any(s != 1 for s in spatial):
        return Rejected(f"it repeats the image along spatial dims (sizes {tuple(sizes)})", BOUNDARY_FIX)
    return Local(layout)


def piece(ctx: OpContext) -> Verdict:
    """One piece of a split/chunk/unbind (see ``fxstream.ops.channel_ops.fuse_pieces``)."""
    kind, dim = ctx.arg(1, "kind"), ctx.arg(3, "dim")
    layout = channel_ops.piece_layout(ctx.layout, kind, dim)
    if layout is None:
        return Rejected(f"torch.{kind} along spatial dim {dim} cuts the image into parts", BOUNDARY_FIX)
    return Local(layout)


def regroup(ctx: OpContext) -> Verdict:
    """A channel-only view (see ``fxstream.ops.channel_ops.channel_view``): the spatial axes keep their
    order, every other dim is a batch/channel dim."""
    axes = iter(ctx.layout[d] for d in ctx.arg(2, "dims"))
    return Local(tuple(next(axes) if s is None else None for s in ctx.arg(1, "shape")))


def reduce_dims(dim_index: int, keepdim_index: int | None = None) -> Callable[[OpContext], Verdict]:
    """mean/sum/amax/norm/var...: a reduction over spatial dims ends the trunk; over channels it is local."""
    keepdim_index = dim_index + 1 if keepdim_index is None else keepdim_index

    def classify(ctx: OpContext) -> Verdict:
        layout = ctx.layout
        dims = _dims(ctx.arg(dim_index, "dim"), len(layout))
        if _spatial_dims(layout, dims):
            return Reduction()
        if ctx.arg(keepdim_index, "keepdim", False):
            return Local(layout)
        return Local(tuple(a for d, a in enumerate(layout) if d not in dims))

    return classify


def reduction(ctx: OpContext) -> Verdict:
    return Reduction()


def rejected(reason: str, fix: str = BOUNDARY_FIX) -> Callable[[OpContext], Verdict]:
    return lambda ctx: Rejected(reason, fix)


def _tuple(value: Any, ndim: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(value)
    return value * ndim if len(value) == 1 else value


def _requires_canonical(ctx: OpContext) -> Rejected | None:
    if ctx.layout != _canonical(ctx.ndim):
        return Rejected(
            f"it expects (N, C, *spatial) input with {ctx.ndim} spatial dims, got layout {ctx.layout}",
            "keep tensors in (N, C, *spatial) order around convolutions and pooling",
        )
    return None


def _conv_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    ndim = len(kernel)
    if padding == "valid":
        return [(0, 0)] * ndim
    if padding == "same":  # torch pads total//2 left and the rest right
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in _tuple(padding, ndim)]


def _conv(ctx: OpContext, input: fx.Node, weight_shape, weight, bias, stride, padding, dilation, groups, fill):
    ndim = ctx.ndim
    if len(weight_shape) != ndim + 2:
        return Rejected(f"a {len(weight_shape) - 2}D convolution in a {ndim}D trunk", "use one dimensionality")
    kernel = tuple(weight_shape[2:])
    stride, dilation = _tuple(stride, ndim), _tuple(dilation, ndim)
    pads = _conv_padding(padding, kernel, dilation)
    stencils = tuple(Stencil(d * (k - 1) + 1, s, lo, hi) for k, s, d, (lo, hi) in zip(kernel, stride, dilation, pads))
    params = dict(weight=weight, bias=bias, stride=stride, dilation=dilation, groups=groups)
    return Window("conv", input, stencils, fill=fill, params=params)


def conv_module(ctx: OpContext) -> Verdict:
    m = ctx.module
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    fill = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}.get(m.padding_mode)
    if fill is None:
        return Rejected(
            f"padding_mode='{m.padding_mode}' wraps around the image, so border pixels depend on the far side",
            "use padding_mode='zeros', 'reflect' or 'replicate'",
        )
    target = ctx.node.target
    bias = f"{target}.bias" if m.bias is not None else None
    return _conv(
        ctx, ctx.node.args[0], m.weight.shape, f"{target}.weight", bias, m.stride, m.padding, m.dilation, m.groups, fill
    )


def _functional_weight(ctx: OpContext) -> Rejected | None:
    """Why a functional (transposed) convolution cannot stream, or None."""
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    if ctx.arg(1, "weight") in ctx.layouts:
        return Rejected("the convolution weight depends on the image", BOUNDARY_FIX)
    return None


def conv_function(ctx: OpContext) -> Verdict:
    bad = _functional_weight(ctx)
    if bad:
        return bad
    weight = ctx.arg(1, "weight")
    shape = _weight_shape(ctx, weight)
    return _conv(
        ctx,
        ctx.arg(0, "input"),
        shape,
        weight,
        ctx.arg(2, "bias"),
        ctx.arg(3, "stride", 1),
        ctx.arg(4, "padding", 0),
        ctx.arg(5, "dilation", 1),
        ctx.arg(6, "groups", 1),
        "constant",
    )


def _weight_shape(ctx: OpContext, weight: Any) -> tuple[int, ...]:
    """Shape of a functional conv weight: known for get_attr, else from the node's meta."""
    if isinstance(weight, fx.Node):
        if "tensor_shape" in weight.meta:
            return tuple(weight.meta["tensor_shape"])
    raise KeyError("weight shape unknown")


def _pool(ctx, kind, input, kernel, stride, padding, dilation, ceil_mode, params):
    ndim = ctx.ndim
    kernel = _tuple(kernel, ndim)
    stride = _tuple(stride if stride not in (None, [], ()) else kernel, ndim)
    padding, dilation = _tuple(padding, ndim), _tuple(dilation, ndim)
    stencils = tuple(
        Stencil(d * (k - 1) + 1, s, p, p, bool(ceil_mode)) for k, s, p, d in zip(kernel, stride, padding, dilation)
    )
    value = float("-inf") if kind == "max_pool" else 0.0
    return Window(
        kind, input, stencils, value=value, params=dict(kernel=kernel, stride=stride, dilation=dilation, **params)
    )


_MAX_POOL_ARGS = (
    ("kernel_size", None),
    ("stride", None),
    ("padding", 0),
    ("dilation", 1),
    ("ceil_mode", False),
    ("return_indices", False),
)
_AVG_POOL_ARGS = (
    ("kernel_size", None),
    ("stride", None),
    ("padding", 0),
    ("ceil_mode", False),
    ("count_include_pad", True),
    ("divisor_override", None),
)


def _read_args(ctx: OpContext, spec: tuple) -> dict:
    """Arguments by name: the module's attributes, or the function's arguments after the input
    (pooling modules and functions use the same names)."""
    if ctx.module is not None:
        return {name: getattr(ctx.module, name, default) for name, default in spec}
    return {name: ctx.arg(i, name, default) for i, (name, default) in enumerate(spec, start=1)}


def max_pool(ctx: OpContext) -> Verdict:
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    a = _read_args(ctx, _MAX_POOL_ARGS)
    if a["return_indices"]:
        return Rejected("max pooling with return_indices gives whole-image positions", "use return_indices=False")
    return _pool(
        ctx,
        "max_pool",
        ctx.arg(0, "input"),
        a["kernel_size"],
        a["stride"],
        a["padding"],
        a["dilation"],
        a["ceil_mode"],
        {},
    )


def avg_pool(ctx: OpContext) -> Verdict:
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    a = _read_args(ctx, _AVG_POOL_ARGS)
    params = dict(include_pad=bool(a["count_include_pad"]), divisor=a["divisor_override"])
    return _pool(
        ctx, "avg_pool", ctx.arg(0, "input"), a["kernel_size"], a["stride"], a["padding"], 1, a["ceil_mode"], params
    )


def _pad_window(ctx: OpContext, input: fx.Node, pad: tuple[int, ...], mode: str, value: float) -> Verdict:
    if mode == "circular":
        return Rejected(
            "circular padding wraps around the image, so border pixels depend on the far side",
            "use constant, reflect or replicate padding",
        )
    layout = ctx.layout
    # F.pad lists (left, right) pairs from the last dim backwards.
    pairs = [(pad[i], pad[i + 1]) for i in range(0, len(pad), 2)]
    per_dim = {len(layout) - 1 - j: pair for j, pair in enumerate(pairs)}
    channel_pads = any(layout[dim] is None and pair != (0, 0) for dim, pair in per_dim.items())
    if channel_pads:  # MONAI's ChannelPad: constant padding of batch/channel dims is local
        if mode != "constant" or any(layout[dim] is not None and pair != (0, 0) for dim, pair in per_dim.items()):
            return Rejected(
                "it pads a batch or channel dim and a spatial dim at once",
                "pad channels and spatial dims in separate F.pad calls, or " + BOUNDARY_FIX,
            )
        return Local(layout)
    if mode != "constant" and layout[-len(pairs) :] != tuple(range(ctx.ndim))[-len(pairs) :]:
        return Rejected(f"{mode} padding of non-trailing spatial dims", "pad in (N, C, *spatial) order")
    stencils = []
    for axis in range(ctx.ndim):
        dim = layout.index(axis)
        lo, hi = per_dim.get(dim, (0, 0))
        stencils.append(Stencil(1, 1, lo, hi))
    return Window("pad", input, tuple(stencils), fill=mode, value=0.0 if value is None else float(value))


def pad_function(ctx: OpContext) -> Verdict:
    pad = ctx.arg(1, "pad")
    if ctx.pending:  # the amounts depend on sizes: window kind and fill now, amounts per input size
        pad = (0,) * len(pad) if isinstance(pad, (tuple, list)) else (0,) * (2 * ctx.ndim)
    verdict = _pad_window(
        ctx, ctx.arg(0, "input"), tuple(pad), ctx.arg(2, "mode", "constant"), ctx.arg(3, "value", None)
    )
    if ctx.pending and isinstance(verdict, Window):
        verdict = dataclasses.replace(verdict, stencils=None)
    return verdict


def pad_module(ctx: OpContext) -> Verdict:
    m = ctx.module
    mode = {nn.ZeroPad2d: "constant"}.get(type(m))
    if isinstance(m, (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d)):
        mode = "reflect"
    elif isinstance(m, (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d)):
        mode = "replicate"
    elif mode is None and type(m).__name__.startswith("Circular"):
        mode = "circular"
    elif mode is None:
        mode = "constant"
    return _pad_window(ctx, ctx.node.args[0], tuple(m.padding), mode, getattr(m, "value", 0.0))


# --- Ops with fractional stride ----------------------------------------------------


def _conv_transpose(ctx, input, weight_shape, weight, bias, stride, padding, output_padding, groups, dilation):
    ndim = ctx.ndim
    if len(weight_shape) != ndim + 2:
        return Rejected(
            f"a {len(weight_shape) - 2}D transposed convolution in a {ndim}D trunk", "use one dimensionality"
        )
    kernel = tuple(weight_shape[2:])
    stride, dilation = _tuple(stride, ndim), _tuple(dilation, ndim)
    padding, output_padding = _tuple(padding, ndim), _tuple(output_padding, ndim)
    stencils = tuple(
        Transposed(d * (k - 1) + 1, s, p, op)
        for k, s, p, op, d in zip(kernel, stride, padding, output_padding, dilation)
    )
    params = dict(weight=weight, bias=bias, stride=stride, dilation=dilation, groups=groups)
    return Window("conv_transpose", input, stencils, params=params)


def conv_transpose_module(ctx: OpContext) -> Verdict:
    m = ctx.module
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    if m.padding_mode != "zeros":
        return Rejected(f"padding_mode='{m.padding_mode}' in a transposed convolution", "use padding_mode='zeros'")
    if ctx.arg(1, "output_size") is not None:
        return Rejected(
            "output_size= makes the output padding depend on the whole image's size",
            "set output_padding on the module instead of passing output_size",
        )
    target = ctx.node.target
    bias = f"{target}.bias" if m.bias is not None else None
    return _conv_transpose(
        ctx,
        ctx.node.args[0],
        m.weight.shape,
        f"{target}.weight",
        bias,
        m.stride,
        m.padding,
        m.output_padding,
        m.groups,
        m.dilation,
    )


def conv_transpose_function(ctx: OpContext) -> Verdict:
    bad = _functional_weight(ctx)
    if bad:
        return bad
    weight = ctx.arg(1, "weight")
    return _conv_transpose(
        ctx,
        ctx.arg(0, "input"),
        _weight_shape(ctx, weight),
        weight,
        ctx.arg(2, "bias"),
        ctx.arg(3, "stride", 1),
        ctx.arg(4, "padding", 0),
        ctx.arg(5, "output_padding", 0),
        ctx.arg(6, "groups", 1),
        ctx.arg(7, "dilation", 1),
    )


_SIZE_FIX = "use scale_factor=..., or pass boundary=... to stream only the part before it"
_MODES = {
    "nearest": "nearest",
    "nearest-exact": "nearest-exact",
    "linear": "linear",
    "bilinear": "linear",
    "trilinear": "linear",
    "bicubic": "cubic",
}


def _resample(ctx, input, size, scale_factor, mode, align_corners, recompute, antialias=False) -> Verdict:
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    if mode not in _MODES:
        return Rejected(
            f"interpolation mode '{mode}' is not supported", "use nearest, nearest-exact, (bi/tri)linear or bicubic"
        )
    if antialias:
        return Rejected("antialiased interpolation (a downsampling filter) is not supported", "use antialias=False")
    if size is not None and ctx.pending:
        return Window("resample", input, None)
    if size is not None and ctx.sizes is not None:  # size computed from other tensors' sizes
        n_in = ctx.sizes[input]
        sizes = _tuple(size, ctx.ndim)
        stencils = tuple(
            Resample(_MODES[mode], n_out / n, int(n_out), bool(align_corners)) for n, n_out in zip(n_in, sizes)
        )
        return Window("resample", input, stencils)
    if size is not None:
        return Rejected(
            f"interpolation to a fixed size={size} does not depend on the input size, so every output pixel "
            "depends on how large the whole image is (non-local)",
            "compute size from another tensor of the trunk (size=skip.shape[2:]), use scale_factor=..., or "
            "pass boundary=... to stream only the part before it",
        )
    if scale_factor is None or isinstance(scale_factor, fx.Node):
        return Rejected("interpolation without a constant scale_factor", _SIZE_FIX)
    scales = _tuple(scale_factor, ctx.ndim) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * ctx.ndim
    if any(not isinstance(f, (int, float)) or f <= 0 for f in scales):
        return Rejected(f"interpolation with scale_factor={scale_factor}", _SIZE_FIX)
    stencils = tuple(Resample(_MODES[mode], float(f), None, bool(align_corners), bool(recompute)) for f in scales)
    return Window("resample", input, stencils)


def interpolate_function(ctx: OpContext) -> Verdict:
    return _resample(
        ctx,
        ctx.arg(0, "input"),
        ctx.arg(1, "size"),
        ctx.arg(2, "scale_factor"),
        ctx.arg(3, "mode", "nearest"),
        ctx.arg(4, "align_corners"),
        ctx.arg(5, "recompute_scale_factor"),
        ctx.arg(6, "antialias", False),
    )


def upsample_module(ctx: OpContext) -> Verdict:
    m = ctx.module
    return _resample(
        ctx,
        ctx.node.args[0],
        m.size,
        m.scale_factor,
        m.mode,
        m.align_corners,
        getattr(m, "recompute_scale_factor", None),
    )


def _shuffle(ctx: OpContext, input: fx.Node, factor: int, up: bool) -> Verdict:
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    if ctx.ndim != 2:
        return Rejected("pixel (un)shuffle acts on the last two dims only", "use it in a 2D trunk")
    if up:
        return Window("shuffle", input, (Shuffle(factor),) * 2, params=dict(factor=factor))
    return Window("unshuffle", input, (Stencil(factor, factor),) * 2, params=dict(factor=factor))


def space_to_depth(ctx: OpContext) -> Verdict:
    """``channel_ops.space_to_depth(x, b, order)`` (TResNet's view/permute/view): each output
    pixel holds a ``b x b`` block of input pixels, a window of extent and stride ``b``."""
    bad = _requires_canonical(ctx)
    if bad:
        return bad
    block, order = ctx.arg(1, "block"), ctx.arg(2, "order")
    params = dict(block=block, order=order)
    return Window("space_to_depth", ctx.arg(0, "x"), (Stencil(block, block),) * ctx.ndim, params=params)


def pixel_shuffle(up: bool) -> Callable[[OpContext], Verdict]:
    def rule(ctx: OpContext) -> Verdict:
        if ctx.module is not None:
            factor = ctx.module.upscale_factor if up else ctx.module.downscale_factor
            return _shuffle(ctx, ctx.node.args[0], factor, up)
        name = "upscale_factor" if up else "downscale_factor"
        return _shuffle(ctx, ctx.arg(0, "input"), ctx.arg(1, name), up)

    return rule


# --- Dynamic ops: windows that depend on spatial sizes ------------------------------------


def needs_sizes(ctx: OpContext) -> bool:
    """Slicing a spatial dim: its crop depends on the tensor's size (``x[..., 1:-1]``)."""
    node = ctx.node
    if not (node.op == "call_function" and node.target is operator.getitem and node.args[0] in ctx.layouts):
        return False
    items = _index_items(node.args[1], len(ctx.layouts[node.args[0]]))
    return items is None or any(_slices_spatial(ctx.layouts[node.args[0]], d, i) for d, i in items)


def pools_whole_map(ctx: OpContext) -> bool:
    """``F.avg_pool2d(x, x.shape[2:])`` and the like: a global pooling spelled with sizes."""
    return function_rule(ctx.node.target) in (avg_pool, max_pool) and isinstance(ctx.arg(1, "kernel_size"), fx.Node)


def accepts_sizes(ctx: OpContext) -> bool:
    node = ctx.node
    return node.op == "call_function" and node.target in (F.pad, F.interpolate, F.upsample, operator.getitem)


def _index_items(index: Any, rank: int) -> list[tuple[int | None, Any]] | None:
    """``x[index]`` as ``(input dim, item)`` pairs, one per item, the Ellipsis expanded and
    missing trailing dims as full slices; a new axis (``None``) has dim None. None when the
    index holds anything but ints, slices, ``None`` and one Ellipsis (lists, tensors)."""
    index = index if isinstance(index, tuple) else (index,)
    allowed = lambda i: i is None or i is Ellipsis or isinstance(i, slice) or type(i) is int  # noqa: E731
    if sum(i is Ellipsis for i in index) > 1 or not all(allowed(i) for i in index):
        return None
    consumed = sum(i is not None and i is not Ellipsis for i in index)
    items, dim = [], 0
    for item in index:
        if item is Ellipsis:
            items += [(d, slice(None)) for d in range(dim, dim + rank - consumed)]
            dim += rank - consumed
        elif item is None:
            items.append((None, None))
        else:
            items.append((dim, item))
            dim += 1
    return items + [(d, slice(None)) for d in range(dim, rank)]


def _slices_spatial(layout: Layout, dim: int | None, item: Any) -> bool:
    return dim is not None and layout[dim] is not None and item != slice(None)


def slicing(ctx: OpContext) -> Verdict:
    """``x[index]``. Along batch and channel dims any int or slice is local (``x[:, a:b]``,
    ``x[:, 0]``, ``x[:, None]``); along a spatial dim, ``a:b:s`` is a window: a crop
    (a pad with negative amounts), strided when ``s > 1``."""
    source, index = ctx.node.args[0], ctx.arg(1, "index")
    layout = ctx.layouts[source]
    items = _index_items(index, len(layout))
    if items is None or any(layout[d] is not None and not isinstance(i, slice) for d, i in items if d is not None):
        return Rejected(
            "it indexes a spatial dim other than by a slice (an int, a list or a tensor picks fixed rows)",
            "index spatial dims with a:b:s only, or " + BOUNDARY_FIX,
        )
    out_layout = tuple(None if d is None else layout[d] for d, i in items if not isinstance(i, int))
    spatial = {layout[d]: i for d, i in items if d is not None and layout[d] is not None}
    if not any(_slices_spatial(layout, d, i) for d, i in items):
        if ctx.pending:  # a size reaches the index through a batch/channel dim
            return Rejected("it indexes a batch or channel dim with a spatial size", BOUNDARY_FIX)
        return Local(out_layout)
    steps = [1 if i.step is None else i.step for i in spatial.values()]
    if not all(type(s) is int and s >= 1 for s in steps):
        return Rejected(f"a spatial slice with steps {steps}", "slice spatial dims with a constant positive step")
    # the window holds the crop; a strided or channel index then picks from it ("slice")
    rest = tuple(slice(None, None, i.step) if d is not None and layout[d] is not None else i for d, i in items)
    if all(s == 1 for s in steps) and out_layout == layout and all(i == slice(None) for i in rest):
        kind, params = "pad", {}
    else:
        kind, params = "slice", {"index": rest}
    if ctx.pending:
        return Window(kind, source, None, params=params, layout=out_layout)
    stencils = []
    for axis in range(ctx.ndim):
        n = ctx.sizes[source][axis]
        start, stop, step = spatial[axis].indices(n)
        stencils.append(Stencil(1, step, -start, max(stop, start) - n))
    return Window(kind, source, tuple(stencils), params=params, layout=out_layout)


# --- The table -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleOp:
    """One declaration per op that has a module form: ``module(x)`` computes
    ``function(x, **{a: module.a for a in attributes})``. It gives the op table its module
    and function rows, the function's in-place twins (``F.relu_``, ``torch.relu_``), and the
    out-of-place form of ``module(inplace=True)`` used by ``fxstream.frontend.functionalize``."""

    module: type
    function: Callable
    attributes: tuple[str, ...] = ()

    def inplace_functions(self) -> list[Callable]:
        name = self.function.__name__ + "_"
        return [getattr(ns, name) for ns in (F, torch) if hasattr(ns, name)]


ACTIVATIONS: tuple[ModuleOp, ...] = (
    ModuleOp(nn.ReLU, F.relu),
    ModuleOp(nn.ReLU6, F.relu6),
    ModuleOp(nn.LeakyReLU, F.leaky_relu, ("negative_slope",)),
    ModuleOp(nn.ELU, F.elu, ("alpha",)),
    ModuleOp(nn.SELU, F.selu),
    ModuleOp(nn.CELU, F.celu, ("alpha",)),
    ModuleOp(nn.GELU, F.gelu, ("approximate",)),
    ModuleOp(nn.SiLU, F.silu),
    ModuleOp(nn.Mish, F.mish),
    ModuleOp(nn.Hardswish, F.hardswish),
    ModuleOp(nn.Hardsigmoid, F.hardsigmoid),
    ModuleOp(nn.Hardtanh, F.hardtanh, ("min_val", "max_val")),
    ModuleOp(nn.Sigmoid, torch.sigmoid),
    ModuleOp(nn.Tanh, torch.tanh),
    ModuleOp(nn.Softplus, F.softplus, ("beta", "threshold")),
    ModuleOp(nn.Softsign, F.softsign),
    ModuleOp(nn.Tanhshrink, F.tanhshrink),
    ModuleOp(nn.LogSigmoid, F.logsigmoid),
    ModuleOp(nn.Threshold, F.threshold, ("threshold", "value")),
)
# Dropout modules take ``inplace`` too (classified by ``dropout`` below, keyed by fxstream.runtime.rng).
DROPOUTS: tuple[ModuleOp, ...] = tuple(
    ModuleOp(module, function, ("p", "training"))
    for module, function in (
        (nn.Dropout, F.dropout),
        (nn.Dropout1d, F.dropout1d),
        (nn.Dropout2d, F.dropout2d),
        (nn.Dropout3d, F.dropout3d),
        (nn.AlphaDropout, F.alpha_dropout),
        (nn.FeatureAlphaDropout, F.feature_alpha_dropout),
    )
)

# Pointwise functions without a module form (those with one are declared in ACTIVATIONS).
_POINTWISE_FUNCTIONS = [
    torch.relu,
    F.sigmoid,
    F.tanh,
    torch.exp,
    torch.abs,
    torch.neg,
    torch.sqrt,
    torch.rsqrt,
    torch.square,
    torch.clamp,
    torch.clip,
    torch.clamp_min,
    torch.clamp_max,
    torch.erf,
    torch.log,
    torch.reciprocal,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.rsub,
    torch.pow,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.as_tensor,
    torch.detach,
    torch.zeros_like,
    torch.ones_like,
    torch.full_like,
    torch.empty_like,
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.neg,
    operator.pow,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.addcmul,
    torch.addcdiv,
    statistics.normalize,  # a decomposed norm's application (ops/statistics.py)
]
FUNCTIONS: dict[Any, Callable[[OpContext], Verdict]] = {f: pointwise for f in _POINTWISE_FUNCTIONS}
FUNCTIONS.update({op.function: pointwise for op in ACTIVATIONS})
FUNCTIONS.update({f: pointwise for op in ACTIVATIONS for f in op.inplace_functions()})
FUNCTIONS.update(
    {
        F.prelu: channel_op,
        F.local_response_norm: channel_op,
        F.batch_norm: batch_norm_function,
        F.layer_norm: over_last(lambda ctx: len(_tuple(ctx.arg(1, "normalized_shape"), 1)), "layer_norm"),
        F.linear: over_last(lambda ctx: 1, "linear"),
        F.softmax: over_dim(1, "dim"),
        F.log_softmax: over_dim(1, "dim"),
        F.normalize: over_dim(2, "dim", 1),
        torch.cat: over_dim(1, "dim", 0),
        torch.concat: over_dim(1, "dim", 0),
        torch.stack: stack,
        getattr: attribute,
        channel_ops.sized: regroup,
        torch.permute: permute,
        torch.unflatten: unflatten,
        torch.repeat_interleave: over_dim(2, "dim"),
        channel_ops.piece: piece,
        channel_ops.regroup: regroup,
        channel_ops.space_to_depth: space_to_depth,
        F.channel_shuffle: channel_op,
        torch.channel_shuffle: channel_op,
        torch.native_channel_shuffle: channel_op,
        torch.transpose: transpose,
        torch.flatten: flatten(1, 0),
        torch.reshape: reduction,
        torch.mean: reduce_dims(1),
        torch.sum: reduce_dims(1),
        torch.amax: reduce_dims(1),
        torch.amin: reduce_dims(1),
        torch.norm: reduce_dims(2),
        torch.linalg.vector_norm: reduce_dims(2),
        torch.var: reduce_dims(1, 3),
        torch.std: reduce_dims(1, 3),
        F.dropout: dropout(2, 1),
        F.dropout1d: dropout(2, 1),
        F.dropout2d: dropout(2, 1),
        F.dropout3d: dropout(2, 1),
        F.alpha_dropout: dropout(2, 1, keyed=False),
        F.feature_alpha_dropout: dropout(2, 1, keyed=False),
        F.conv1d: conv_function,
        F.conv2d: conv_function,
        F.conv3d: conv_function,
        F.avg_pool1d: avg_pool,
        F.avg_pool2d: avg_pool,
        F.avg_pool3d: avg_pool,
        F.pad: pad_function,
        operator.getitem: slicing,
        F.group_norm: rejected("GroupNorm normalises with statistics over the whole image"),
        F.instance_norm: rejected("InstanceNorm normalises with statistics over the whole image"),
        F.interpolate: interpolate_function,
        F.upsample: interpolate_function,
        F.pixel_shuffle: pixel_shuffle(up=True),
        F.pixel_unshuffle: pixel_shuffle(up=False),
        F.conv_transpose1d: conv_transpose_function,
        F.conv_transpose2d: conv_transpose_function,
        F.conv_transpose3d: conv_transpose_function,
    }
)
for _name in ["max_pool1d", "max_pool2d", "max_pool3d", "_max_pool1d", "_max_pool2d", "_max_pool3d"]:
    FUNCTIONS[getattr(F, _name)] = max_pool
for _name in ["max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices"]:
    FUNCTIONS[getattr(F, _name)] = rejected(
        "max pooling with return_indices gives whole-image positions", "use return_indices=False"
    )
for _name in [
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "_adaptive_max_pool1d",
    "_adaptive_max_pool2d",
    "_adaptive_max_pool3d",
]:
    if hasattr(F, _name):
        FUNCTIONS[getattr(F, _name)] = reduction
for _name in ["conv1d", "conv2d", "conv3d"]:
    FUNCTIONS[getattr(torch, _name)] = conv_function
for _name in ["max_pool1d", "max_pool2d", "max_pool3d"]:
    FUNCTIONS[getattr(torch, _name)] = max_pool
for _name in ["avg_pool1d"]:
    FUNCTIONS[getattr(torch, _name)] = avg_pool
# torchvision's stochastic depth is wrapped for FX (identity when not training). It is known
# by name, so that importing fxstream does not import torchvision (an optional dependency).
STOCHASTIC_DEPTH = dropout(3, 1)


def is_torchvision_stochastic_depth(target) -> bool:
    return (
        getattr(target, "__module__", None) == "torchvision.ops.stochastic_depth"
        and getattr(target, "__name__", None) == "stochastic_depth"
    )


def function_rule(target):
    """The op-table rule of a ``call_function`` target, or None."""
    rule = FUNCTIONS.get(target)
    if rule is None and is_torchvision_stochastic_depth(target):
        return STOCHASTIC_DEPTH
    return rule


_POINTWISE_METHODS = [
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "abs",
    "neg",
    "sqrt",
    "rsqrt",
    "square",
    "clamp",
    "clamp_",
    "clip",
    "clamp_min",
    "add",
    "add_",
    "sub",
    "sub_",
    "mul",
    "mul_",
    "div",
    "div_",
    "pow",
    "contiguous",
    "clone",
    "float",
    "double",
    "half",
    "bfloat16",
    "to",
    "type_as",
    "exp_",
    "neg_",
    "detach",
    "addcmul",
    "addcdiv",
]
METHODS: dict[str, Callable[[OpContext], Verdict]] = {m: pointwise for m in _POINTWISE_METHODS}
METHODS.update(
    {
        "permute": permute,
        "transpose": transpose,
        "flatten": flatten(1, 0),
        "unflatten": unflatten,
        "view": reduction,
        "reshape": reduction,
        "mean": reduce_dims(1),
        "sum": reduce_dims(1),
        "amax": reduce_dims(1),
        "amin": reduce_dims(1),
        "norm": reduce_dims(2),
        "var": reduce_dims(1, 3),
        "std": reduce_dims(1, 3),
        "softmax": over_dim(1, "dim"),
        "log_softmax": over_dim(1, "dim"),
        "repeat": repeat,
        "repeat_interleave": over_dim(2, "dim"),
    }
)

MODULES: dict[type, Callable[[OpContext], Verdict]] = {a.module: pointwise for a in ACTIVATIONS}
MODULES[nn.Identity] = pointwise
MODULES.update({m: conv_module for m in (nn.Conv1d, nn.Conv2d, nn.Conv3d)})
MODULES.update({m: max_pool for m in (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)})
MODULES.update({m: avg_pool for m in (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)})
MODULES.update({m: batch_norm_module for m in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)})
MODULES.update({m: dropout(0, 0) for m in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)})
MODULES.update({m: dropout(0, 0, keyed=False) for m in (nn.AlphaDropout, nn.FeatureAlphaDropout)})
MODULES.update(
    {
        m: pad_module
        for m in (
            nn.ZeroPad1d,
            nn.ZeroPad2d,
            nn.ZeroPad3d,
            nn.ConstantPad1d,
            nn.ConstantPad2d,
            nn.ConstantPad3d,
            nn.ReflectionPad1d,
            nn.ReflectionPad2d,
            nn.ReflectionPad3d,
            nn.ReplicationPad1d,
            nn.ReplicationPad2d,
            nn.ReplicationPad3d,
            nn.CircularPad1d,
            nn.CircularPad2d,
            nn.CircularPad3d,
        )
    }
)
MODULES.update(
    {
        m: reduction
        for m in (
            nn.AdaptiveAvgPool1d,
            nn.AdaptiveAvgPool2d,
            nn.AdaptiveAvgPool3d,
            nn.AdaptiveMaxPool1d,
            nn.AdaptiveMaxPool2d,
            nn.AdaptiveMaxPool3d,
        )
    }
)
MODULES.update(
    {
        nn.PReLU: channel_op,
        nn.ChannelShuffle: channel_op,
        nn.LocalResponseNorm: channel_op,
        nn.LayerNorm: over_last(lambda ctx: len(ctx.module.normalized_shape), "LayerNorm"),
        nn.Linear: over_last(lambda ctx: 1, "Linear"),
        nn.Softmax: lambda ctx: over_dim(99, "dim", ctx.module.dim)(ctx),
        nn.LogSoftmax: lambda ctx: over_dim(99, "dim", ctx.module.dim)(ctx),
        nn.Flatten: flatten(0, 1),
        nn.GroupNorm: rejected("GroupNorm normalises with statistics over the whole image"),
        nn.InstanceNorm1d: rejected("InstanceNorm normalises with statistics over the whole image"),
        nn.InstanceNorm2d: rejected("InstanceNorm normalises with statistics over the whole image"),
        nn.InstanceNorm3d: rejected("InstanceNorm normalises with statistics over the whole image"),
        nn.Upsample: upsample_module,
        nn.UpsamplingNearest2d: upsample_module,
        nn.UpsamplingBilinear2d: upsample_module,
        nn.ConvTranspose1d: conv_transpose_module,
        nn.ConvTranspose2d: conv_transpose_module,
        nn.ConvTranspose3d: conv_transpose_module,
        nn.PixelShuffle: pixel_shuffle(up=True),
        nn.PixelUnshuffle: pixel_shuffle(up=False),
        nn.MultiheadAttention: rejected("attention over pixels mixes the whole image"),
    }
)


# Out-of-place forms of modules with ``inplace=True``: function, module attributes as kwargs.
# Derived from the declarations above, so a module cannot be local without its out-of-place form.
INPLACE_MODULES: dict[type, tuple[Callable, tuple[str, ...]]] = {
    op.module: (op.function, op.attributes) for op in ACTIVATIONS + DROPOUTS
}

# Ops whose result may share storage with their input.
VIEW_METHODS = {
    "view",
    "reshape",
    "permute",
    "transpose",
    "narrow",
    "expand",
    "contiguous",
    "flatten",
    "squeeze",
    "unsqueeze",
    "view_as",
    "unflatten",
    "as_strided",
    "detach",
    "t",
}
VIEW_FUNCTIONS = {
    operator.getitem,
    channel_ops.piece,
    channel_ops.regroup,
    torch.unflatten,
    torch.permute,
    torch.transpose,
    torch.narrow,
    torch.reshape,
    torch.flatten,
    torch.squeeze,
    torch.unsqueeze,
    torch.detach,
}


def statistics_verdict(ctx: OpContext) -> Verdict | None:
    """Global statistics (``ops/statistics.py``): a reducer (``Statistic``), a norm to rewrite
    (``Decompose``), a refusal, or None when the rows below decide."""
    node = ctx.node
    if node.op == "call_function" and node.target is statistics.moments:
        return statistics.moments_verdict(node)
    if not ctx.spatial_inputs():
        return None
    found = statistics.classify(node, ctx.module, ctx.layout, ctx.ndim, ctx.arg)
    if isinstance(found, statistics.Refused):
        return Rejected(found.reason, found.fix)
    return found


def classify(ctx: OpContext) -> Verdict:
    """Look the node up in the table; unknown ops are rejected."""
    found = statistics_verdict(ctx)
    return found if found is not None else classify_rows(ctx)


def classify_rows(ctx: OpContext) -> Verdict:
    """The table's rows alone, without the global statistics of ``ops/statistics.py``."""
    node = ctx.node
    if node.op == "call_module":
        rule = MODULES.get(type(ctx.module))
        name = f"module {type(ctx.module).__name__}"
    elif node.op == "call_function":
        rule = function_rule(node.target)
        name = f"function {getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', node.target)}"
    elif node.op == "call_method":
        rule = METHODS.get(node.target)
        name = f"method Tensor.{node.target}"
    else:
        rule, name = None, node.op
    if rule is None:
        return Unknown(f"fxstream does not know whether {name} is local", BOUNDARY_FIX)
    return rule(ctx)
