"""Property-based fuzzing: random *local* conv networks must stream exactly.

Hypothesis draws a random DAG of supported ops - Conv2d/F.conv2d (non-square kernels,
strides, int/tuple/'same'/'valid' padding, dilation, groups, bias, zeros/reflect/replicate
padding modes, shared weights), max/avg pooling (ceil_mode, count_include_pad,
divisor_override, dilation), F.pad (constant/reflect/replicate, asymmetric, negative),
pointwise activations (also in place), eval BatchNorm, per-channel and scalar
arithmetic, add/sub/mul merges (also in place), channel concatenation, and the ops with
fractional stride: ConvTranspose2d (stride, padding, output_padding, dilation, groups),
nn.Upsample (nearest, nearest-exact, bilinear, bicubic; align_corners; integer,
fractional and per-axis scale factors) and PixelShuffle/PixelUnshuffle - a random
non-square image, and a tile size just above the trunk's minimum, so that the image is
cut into many tiles with ragged last tiles. The streamed model must match the
unstreamed one on the output, every parameter gradient and the input gradient to
1e-10 relative error in float64 (``exactness.check_streamed``). Merges of branches with
different strides (shapes equal only at the sampled size) must be refused with an
``FxStreamError`` instead.

Networks are :class:`FuzzNet`, an ``nn.Module`` whose ``forward`` walks a static list
of op specs (torch.fx unrolls it). Shapes are tracked at construction by a dry run on
a tensor of the sampled size, so ops the model itself could not run (output smaller
than one pixel, reflect padding wider than the input...) are never added.

CI runs 25 examples (a few seconds). For a long fuzzing session::

    FXSTREAM_FUZZ_EXAMPLES=2000 python -m pytest tests/test_fuzz.py -q

``FXSTREAM_FUZZ_MAX_OPS`` (default 8) allows deeper networks. Add
``--hypothesis-show-statistics`` to see what was generated and ``--hypothesis-seed=N``
to replay a session. A failure prints the model as a paste-able ``FuzzNet(...)``
expression (via ``hypothesis.note``) with the input shape and tile size. The plain
tests at the end are regressions the fuzzer found.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

import fxstream

EXAMPLES = int(os.environ.get("FXSTREAM_FUZZ_EXAMPLES", "25"))
MAX_OPS = int(os.environ.get("FXSTREAM_FUZZ_MAX_OPS", "8"))
MAX_TILES_PER_DIM = 5  # bounds runtime: at most 25 tiles per example
MAX_CHANNELS = 8
IMAGE_SIZES = (9, 60)  # per side

ACTIVATIONS = ["relu", "gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "leaky_relu", "hardswish"]
INPLACE_ACTIVATIONS = ["relu", "silu", "sigmoid", "tanh", "leaky_relu", "hardswish"]
ACT_MODULES = {
    "relu": lambda p: nn.ReLU(inplace=p["inplace"]),
    "gelu": lambda p: nn.GELU(),
    "gelu_tanh": lambda p: nn.GELU(approximate="tanh"),
    "silu": lambda p: nn.SiLU(inplace=p["inplace"]),
    "sigmoid": lambda p: nn.Sigmoid(),
    "tanh": lambda p: nn.Tanh(),
    "leaky_relu": lambda p: nn.LeakyReLU(p["slope"], inplace=p["inplace"]),
    "hardswish": lambda p: nn.Hardswish(inplace=p["inplace"]),
}


def _act_function(x, name, p):
    inplace, form = p["inplace"], p["form"]
    if name == "relu":
        if inplace:
            return torch.relu_(x) if form == 1 else x.relu_() if form == 2 else F.relu(x, inplace=True)
        return torch.relu(x) if form == 1 else x.relu() if form == 2 else F.relu(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    if name == "silu":
        return F.silu(x, inplace=inplace)
    if name == "sigmoid":
        if inplace:
            return x.sigmoid_()
        return torch.sigmoid(x) if form == 1 else x.sigmoid() if form == 2 else F.sigmoid(x)
    if name == "tanh":
        if inplace:
            return x.tanh_()
        return torch.tanh(x) if form == 1 else x.tanh() if form == 2 else F.tanh(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, p["slope"], inplace=inplace)
    if name == "hardswish":
        return F.hardswish(x, inplace=inplace)
    raise ValueError(name)


class Params(nn.Module):
    """Holds the parameters of a functional op (F.conv2d weight/bias, channel scale)."""


def make_module(kind: str, p: dict) -> nn.Module | None:
    """The submodule (or parameter holder) of one op spec, or None."""
    if kind == "conv":
        return nn.Conv2d(p["cin"], p["cout"], p["kernel"], p["stride"], p["padding"], p["dilation"], p["groups"],
                         p["bias"], p["mode"])
    if kind == "fconv":
        conv = nn.Conv2d(p["cin"], p["cout"], p["kernel"], groups=p["groups"], bias=p["bias"])
        holder = Params()
        holder.weight = conv.weight
        holder.bias = conv.bias
        return holder
    if kind == "maxpool":
        return nn.MaxPool2d(p["kernel"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil"])
    if kind == "avgpool":
        return nn.AvgPool2d(p["kernel"], p["stride"], p["padding"], p["ceil"], p["include_pad"], p["divisor"])
    if kind == "bn":
        bn = nn.BatchNorm2d(p["c"], affine=p["affine"])
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.25, 2.0)
            if p["affine"]:
                bn.weight.normal_()
                bn.bias.normal_()
        return bn
    if kind == "act" and p["module"]:
        return ACT_MODULES[p["name"]](p)
    if kind == "convT":
        return nn.ConvTranspose2d(p["cin"], p["cout"], p["kernel"], p["stride"], p["padding"], p["output_padding"],
                                  p["groups"], p["bias"], p["dilation"])
    if kind == "upsample":
        return nn.Upsample(scale_factor=p["scale"], mode=p["mode"], align_corners=p["align_corners"])
    if kind == "shuffle":
        return nn.PixelShuffle(2) if p["up"] else nn.PixelUnshuffle(2)
    if kind == "chmul":
        holder = Params()
        holder.scale = nn.Parameter(torch.randn(p["c"], 1, 1))
        return holder
    return None


def apply_op(kind: str, p: dict, mod, args: list):
    """Run one op spec on its inputs (shared by FuzzNet.forward and the dry run)."""
    x = args[0]
    if kind in ("conv", "maxpool", "avgpool", "bn", "reuse", "convT", "upsample", "shuffle"):
        return mod(x)
    if kind == "fconv":
        return F.conv2d(x, mod.weight, mod.bias, p["stride"], p["padding"], p["dilation"], p["groups"])
    if kind == "fmaxpool":
        return F.max_pool2d(x, p["kernel"], p["stride"], p["padding"], p["dilation"], ceil_mode=p["ceil"])
    if kind == "favgpool":
        return F.avg_pool2d(x, p["kernel"], p["stride"], p["padding"], p["ceil"], p["include_pad"], p["divisor"])
    if kind == "pad":
        if p["mode"] == "constant":
            return F.pad(x, p["pad"], mode="constant", value=p["value"])
        return F.pad(x, p["pad"], mode=p["mode"])
    if kind == "act":
        return mod(x) if p["module"] else _act_function(x, p["name"], p)
    if kind == "chmul":
        return x * mod.scale
    if kind == "scalar":
        c = p["c"]
        return {"add": lambda: x + c, "radd": lambda: c + x, "mul": lambda: x * c, "rsub": lambda: c - x,
                "div": lambda: x / c, "torch.add": lambda: torch.add(x, c), "neg": lambda: -x,
                "add_": lambda: x.add_(c), "mul_": lambda: x.mul_(c)}[p["op"]]()
    if kind == "merge":
        y = args[1]
        return {"add": lambda: x + y, "sub": lambda: x - y, "mul": lambda: x * y,
                "torch.add": lambda: torch.add(x, y), "torch.mul": lambda: torch.mul(x, y),
                "add_": lambda: x.add_(y), "sub_": lambda: x.sub_(y), "mul_": lambda: x.mul_(y)}[p["op"]]()
    if kind == "cat":
        return torch.cat(args, dim=1) if p["form"] == 0 else torch.cat(args, 1)
    raise ValueError(kind)


class FuzzNet(nn.Module):
    """``ops`` is a list of ``(kind, inputs, params)``; node 0 is the image, node i+1 the
    result of ``ops[i]``. The last node is the trunk output; ``head`` is None (dense
    output), ``'linear'`` (adaptive avg pool, flatten, Linear) or ``'mean'``."""

    def __init__(self, in_channels: int, ops: list, head: str | None = None, seed: int = 0):
        super().__init__()
        self.in_channels, self.ops, self.head_kind, self.seed = in_channels, list(ops), head, seed
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for i, (kind, _, p) in enumerate(self.ops):
                mod = make_module(kind, p)
                if mod is not None:
                    self.add_module(f"op{i}", mod)
            if head == "linear":
                self.pool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(_channels(in_channels, self.ops), 3)

    def forward(self, x):
        vals = [x]
        for i, (kind, inputs, p) in enumerate(self.ops):
            mod = getattr(self, f"op{p['of'] if kind == 'reuse' else i}", None)
            vals.append(apply_op(kind, p, mod, [vals[j] for j in inputs]))
        out = vals[-1]
        if self.head_kind == "linear":
            out = self.fc(torch.flatten(self.pool(out), 1))
        elif self.head_kind == "mean":
            out = out.mean(dim=(2, 3))
        return out

    def __repr__(self) -> str:  # a paste-able expression
        lines = ",\n    ".join(repr(op) for op in self.ops)
        return f"FuzzNet({self.in_channels}, [\n    {lines},\n], head={self.head_kind!r}, seed={self.seed})"


def is_inplace(kind: str, p: dict) -> bool:
    return bool(p.get("inplace")) or str(p.get("op", "")).endswith("_")


def _channels(in_channels: int, ops: list) -> int:
    channels = [in_channels]
    for kind, inputs, p in ops:
        if kind in ("conv", "fconv", "convT"):
            channels.append(p["cout"])
        elif kind == "shuffle":
            channels.append(channels[inputs[0]] // 4 if p["up"] else channels[inputs[0]] * 4)
        elif kind == "reuse":
            channels.append(ops[p["of"]][2]["cout"])
        elif kind == "cat":
            channels.append(sum(channels[j] for j in inputs))
        else:
            channels.append(channels[inputs[0]])
    return channels[-1]


# --- Drawing random networks ------------------------------------------------------------


def _pair(data, lo, hi, label):
    """An int or a non-square (h, w) pair."""
    if data.draw(st.booleans(), label=f"{label} square"):
        return data.draw(st.integers(lo, hi), label=label)
    return (data.draw(st.integers(lo, hi), label=f"{label} h"), data.draw(st.integers(lo, hi), label=f"{label} w"))


def _t(v):
    return v if isinstance(v, tuple) else (v, v)


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def draw_conv(data, c, functional):
    cout = data.draw(st.integers(1, 4), label="cout")
    groups = data.draw(st.sampled_from([g for g in _divisors(c) if cout % g == 0]), label="groups")
    kernel = _pair(data, 1, 5, "kernel")
    stride = _pair(data, 1, 3, "stride")
    dilation = _pair(data, 1, 3, "dilation")
    padding_kinds = ["int", "tuple", "valid"] + (["same"] if _t(stride) == (1, 1) else [])
    pk = data.draw(st.sampled_from(padding_kinds), label="padding kind")
    if pk == "int":
        padding = data.draw(st.integers(0, 4), label="padding")
    elif pk == "tuple":
        padding = (data.draw(st.integers(0, 4), label="padding h"), data.draw(st.integers(0, 4), label="padding w"))
    else:
        padding = pk
    mode = "zeros" if functional else data.draw(st.sampled_from(["zeros", "reflect", "replicate"]), label="mode")
    bias = data.draw(st.booleans(), label="bias")
    return dict(cin=c, cout=cout, kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                bias=bias, mode=mode)


def draw_pool(data, kind):
    kernel = _pair(data, 1, 4, "pool kernel")
    kh, kw = _t(kernel)
    stride = data.draw(st.one_of(st.none(), st.integers(1, 3), st.tuples(st.integers(1, 3), st.integers(1, 3))),
                       label="pool stride")
    padding = (data.draw(st.integers(0, kh // 2), label="pool pad h"), data.draw(st.integers(0, kw // 2),
                                                                                  label="pool pad w"))
    if padding[0] == padding[1] and data.draw(st.booleans(), label="pool pad as int"):
        padding = padding[0]
    p = dict(kernel=kernel, stride=stride, padding=padding, ceil=data.draw(st.booleans(), label="ceil_mode"))
    if kind.endswith("maxpool"):
        p["dilation"] = data.draw(st.sampled_from([1, 2, (1, 2), (2, 1)]), label="pool dilation")
    else:
        p["include_pad"] = data.draw(st.booleans(), label="count_include_pad")
        p["divisor"] = data.draw(st.one_of(st.none(), st.integers(1, 7)), label="divisor_override")
    return p  # stride None means stride = kernel, for the modules and F.*_pool2d alike


def draw_pad(data):
    mode = data.draw(st.sampled_from(["constant", "reflect", "replicate"]), label="pad mode")
    lo = -2 if mode == "constant" else 0  # negative pads crop
    pad = tuple(data.draw(st.integers(lo, 4), label=f"pad {side}") for side in ("left", "right", "top", "bottom"))
    value = data.draw(st.sampled_from([0.0, 0.5, -1.25]), label="pad value") if mode == "constant" else None
    return dict(pad=pad, mode=mode, value=value)


def draw_conv_transpose(data, c):
    cout = data.draw(st.integers(1, 4), label="cout")
    groups = data.draw(st.sampled_from([g for g in _divisors(c) if cout % g == 0]), label="groups")
    stride = _pair(data, 1, 3, "convT stride")
    dilation = _pair(data, 1, 2, "convT dilation")
    # torch requires output_padding < max(stride, dilation) per axis
    limit = [max(s, d) - 1 for s, d in zip(_t(stride), _t(dilation))]
    output_padding = tuple(data.draw(st.integers(0, m), label="output_padding") for m in limit)
    return dict(cin=c, cout=cout, kernel=_pair(data, 1, 4, "convT kernel"), stride=stride,
                padding=_pair(data, 0, 2, "convT padding"), output_padding=output_padding, dilation=dilation,
                groups=groups, bias=data.draw(st.booleans(), label="bias"))


def draw_upsample(data):
    mode = data.draw(st.sampled_from(["nearest", "nearest-exact", "bilinear", "bicubic"]), label="upsample mode")
    scale = data.draw(st.sampled_from([2, 3, 1.5, 2.5, (2, 1), (1.5, 3)]), label="scale")
    align = data.draw(st.booleans(), label="align_corners") if mode in ("bilinear", "bicubic") else None
    return dict(scale=scale, mode=mode, align_corners=align)


def cumulative_stride(kind, p, stride):
    if kind == "convT":
        s = tuple(Fraction(1, v) for v in _t(p["stride"]))
        return (stride[0] * s[0], stride[1] * s[1])
    if kind == "upsample":
        s = tuple(1 / Fraction(v).limit_denominator(16) for v in _t(p["scale"]))
        return (stride[0] * s[0], stride[1] * s[1])
    if kind == "shuffle":
        s = Fraction(1, 2) if p["up"] else 2
        return (stride[0] * s, stride[1] * s)
    if kind in ("conv", "fconv", "reuse"):
        s = _t(p["stride"])
    elif kind in ("maxpool", "fmaxpool", "avgpool", "favgpool"):
        s = _t(p["stride"] if p["stride"] is not None else p["kernel"])
    else:
        return stride
    return (stride[0] * s[0], stride[1] * s[1])


OP_KINDS = ["conv", "conv", "conv", "fconv", "reuse", "maxpool", "fmaxpool", "avgpool", "favgpool", "pad",
            "act", "act", "act", "bn", "chmul", "scalar", "merge", "merge", "cat", "convT", "upsample", "shuffle"]
MAX_SIDE = 150  # upsampling ops that would grow a map beyond this are skipped


def draw_network(data, batch, in_channels, size):
    """Draw op specs one by one, keeping only those the model can run at ``size``."""
    x = torch.zeros(batch, in_channels, *size, dtype=torch.float64)
    vals, strides, ops = [x], [(1, 1)], []
    irregular = [False]  # downstream of a merge of different strides
    n_ops = data.draw(st.integers(1, MAX_OPS), label="number of ops")
    for _ in range(n_ops):
        kind = data.draw(st.sampled_from(OP_KINDS), label="op kind")
        last = len(vals) - 1
        # Mostly chain on the latest node, often branch from an earlier one.
        src = data.draw(st.one_of(st.just(last), st.just(max(0, last - 1)), st.integers(0, last)), label="input node")
        c = vals[src].shape[1]
        inputs = (src,)
        if kind in ("conv", "fconv"):
            p = draw_conv(data, c, kind == "fconv")
        elif kind == "convT":
            p = draw_conv_transpose(data, c)
        elif kind == "upsample":
            p = draw_upsample(data)
        elif kind == "shuffle":
            p = dict(up=data.draw(st.booleans(), label="shuffle up"))
        elif kind == "reuse":  # apply an earlier Conv2d module again (shared weights)
            convs = [i for i, (k, _, q) in enumerate(ops) if k == "conv" and q["cin"] == c]
            if not convs:
                continue
            of = data.draw(st.sampled_from(convs), label="reused conv")
            p = dict(of=of, stride=ops[of][2]["stride"])
        elif kind.endswith("pool"):
            p = draw_pool(data, kind)
        elif kind == "pad":
            p = draw_pad(data)
        elif kind == "act":
            name = data.draw(st.sampled_from(ACTIVATIONS), label="activation")
            # In place: never on the image (eager autograd forbids it on a leaf that requires grad).
            inplace = (name in INPLACE_ACTIVATIONS and src != 0
                       and data.draw(st.booleans(), label="inplace"))
            module = data.draw(st.booleans(), label="as module")
            if module and inplace and name in ("sigmoid", "tanh"):
                module = False  # nn.Sigmoid/nn.Tanh have no inplace flag
            p = dict(name=name, module=module, inplace=inplace, form=data.draw(st.integers(0, 2), label="form"))
            if name == "leaky_relu":
                # torch cannot differentiate in-place leaky_relu with a negative slope
                slopes = [0.01, 0.2] if inplace else [0.01, 0.2, -0.5]
                p["slope"] = data.draw(st.sampled_from(slopes), label="slope")
        elif kind == "bn":
            p = dict(c=c, affine=data.draw(st.booleans(), label="affine"))
        elif kind == "chmul":
            p = dict(c=c)
        elif kind == "scalar":
            scalar_ops = ["add", "radd", "mul", "rsub", "div", "torch.add", "neg"]
            scalar_ops += ["add_", "mul_"] if src != 0 else []  # in place: never on the image
            p = dict(op=data.draw(st.sampled_from(scalar_ops), label="scalar op"),
                     c=data.draw(st.sampled_from([0.5, -1.5, 2.0, 3.25]), label="scalar"))
        elif kind in ("merge", "cat"):
            shape = vals[src].shape
            if kind == "merge":
                partners = [j for j, v in enumerate(vals) if v.shape == shape]
            else:
                partners = [j for j, v in enumerate(vals)
                            if v.shape[2:] == shape[2:] and v.shape[1] + c <= MAX_CHANNELS]
            # Branches with different cumulative strides whose shapes agree only at this size
            # are not translation-equivariant: fxstream must refuse them (FxStreamError). Draw
            # such a merge now and then, when one is possible.
            regular = [j for j in partners if strides[j] == strides[src]]
            if regular and data.draw(st.integers(0, 9), label="allow stride mismatch") > 0:
                partners = regular
            if not partners:
                continue
            other = data.draw(st.sampled_from(partners), label="second input")
            inputs = (src, other) if data.draw(st.booleans(), label="order") else (other, src)
            if kind == "merge":
                merge_ops = ["add", "sub", "mul", "torch.add", "torch.mul"]
                merge_ops += ["add_", "sub_", "mul_"] if inputs[0] != 0 else []  # x.add_(y) rewrites x
                p = dict(op=data.draw(st.sampled_from(merge_ops), label="merge op"))
            else:
                p = dict(form=data.draw(st.integers(0, 1), label="cat form"))
        else:
            raise AssertionError(kind)
        # Dry run: skip ops the unstreamed model could not run on this image size.
        try:
            mod = make_module(kind, p) if kind != "reuse" else make_module("conv", ops[p["of"]][2])
            if mod is not None:
                mod.double().eval()
            with torch.no_grad():
                y = apply_op(kind, p, mod, [vals[j] for j in inputs])
        except (RuntimeError, ValueError):
            continue
        if min(y.shape[2:]) < 1 or max(y.shape[2:]) > MAX_SIDE or y.shape[1] > 4 * MAX_CHANNELS:
            continue
        if not torch.isfinite(y).all():
            # A dilated max-pool window whose taps all fall in the padding gives -inf, and
            # torch's CPU backward then writes out of bounds (heap corruption): not a valid model.
            continue
        vals.append(y)
        strides.append(cumulative_stride(kind, p, strides[src]))
        irregular.append(any(irregular[j] or strides[j] != strides[src] for j in inputs))
        ops.append((kind, inputs, p))
    return ops, vals[-1], strides[-1], irregular[-1]


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_random_local_network_streams_exactly(data):
    h = data.draw(st.integers(*IMAGE_SIZES), label="image height")
    w = data.draw(st.integers(*IMAGE_SIZES), label="image width")
    batch = data.draw(st.integers(1, 2), label="batch")
    in_channels = data.draw(st.integers(1, 4), label="in channels")
    ops, out, out_stride, irregular = draw_network(data, batch, in_channels, (h, w))
    event(f"ops: {len(ops)}")
    assume(ops and min(out.shape[2:]) >= 1)
    for kind in sorted({kind for kind, _, _ in ops}):
        event(f"has {kind}")
    if any(is_inplace(kind, p) for kind, _, p in ops):
        event("has in-place op")
    head = data.draw(st.sampled_from([None, None, "linear", "mean"]), label="head")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    model = FuzzNet(in_channels, ops, head, seed).double().eval()
    note(f"model = {model!r}")
    note(f"x = torch.randn{(batch, in_channels, h, w)}")
    if any(is_inplace(kind, p) for kind, _, p in ops):
        # An in-place op may overwrite a tensor that an earlier op saved for its backward
        # (relu -> relu_): then the model itself cannot be differentiated.
        try:
            model(torch.zeros(batch, in_channels, h, w, dtype=torch.float64, requires_grad=True)).sum().backward()
        except RuntimeError as exc:
            assert "inplace operation" in str(exc), exc
            event("in-place op breaks the model's own backward")
            assume(False)
        model.zero_grad(set_to_none=True)

    if irregular:
        event("merge of different strides: refused")
        with pytest.raises(fxstream.FxStreamError):
            fxstream.compile(model, tile_size=10**6)
        return

    try:
        plan = fxstream.compile(model, tile_size=1, schedule="recompute").plan
        # a pointwise trunk: one-pixel tiles are valid. A trunk that upsamples has a plan from
        # bounds: it compiles at any tile size, and its receptive field bound is a valid tile.
        minimum = (1, 1) if plan.exact else plan.receptive_field
    except fxstream.TileSizeError as exc:
        minimum = exc.minimum
    assert minimum is not None and len(minimum) == 2, minimum

    # tile = minimum + S*(block-1) + jitter gives `block` output pixels per tile (jitter < S
    # makes the tile ragged inside one stride); keep at most MAX_TILES_PER_DIM tiles per dim.
    # Under carry a tile also reads the left halo of its cell from the image, which is not
    # carried: the planner states the exact smallest tile for this input size.
    schedule = data.draw(st.sampled_from(["carry", "recompute"]), label="schedule")
    event(f"schedule: {schedule}")
    if schedule == "carry":
        minimum = tuple(max(a, b) for a, b in zip(minimum, _carry_minimum(model, (h, w))))
    tile = []
    for axis, (m, s, n) in enumerate(zip(minimum, out_stride, out.shape[2:])):
        s = math.ceil(s)  # after upsampling the stride is a fraction; the tile stays an int
        if data.draw(st.integers(0, 9), label=f"whole tile {axis}") == 0:
            tile.append(m + s * n + data.draw(st.integers(0, 5), label=f"extra {axis}"))
            continue
        lo = max(1, math.ceil(n / MAX_TILES_PER_DIM))
        block = data.draw(st.integers(lo, max(lo, min(n, lo + 4))), label=f"block {axis}")
        tile.append(m + s * (block - 1) + data.draw(st.integers(0, s - 1), label=f"jitter {axis}"))
    tile_size = tile[0] if tile[0] == tile[1] and data.draw(st.booleans(), label="int tile") else tuple(tile)
    note(f"tile_size = {tile_size!r} (minimum {minimum})")

    x = torch.randn(batch, in_channels, h, w, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    smodel = fxstream.compile(model, tile_size, schedule=schedule)
    errors = check_streamed(model, x, tile_size, seed=seed, streamed=smodel)
    n_tiles = len(smodel.shape_plan(h, w).tiles)
    event(f"tiles: {'1' if n_tiles == 1 else '2-4' if n_tiles <= 4 else '5-12' if n_tiles <= 12 else '13+'}")
    event(f"worst error: {'0' if max(errors.values()) == 0 else f'1e{math.floor(math.log10(max(errors.values())))}'}")


def _carry_minimum(model: nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    """The smallest carry tile for an input of ``size`` (TileSizeError.minimum of a one-pixel tile)."""
    try:
        fxstream.compile(model, tile_size=1, schedule="carry").shape_plan(*size)
    except fxstream.TileSizeError as exc:
        assert exc.minimum is not None and len(exc.minimum) == 2, exc
        return tuple(exc.minimum)
    return (1, 1)


# --- Regressions found by the fuzzer --------------------------------------------------------


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_ceil_mode_pool_window_larger_than_input(pool):
    # conv -> 2x10 map; a 3x3 ceil_mode window hangs over the bottom edge: 1x4 output in torch.
    cls = nn.MaxPool2d if pool == "max" else nn.AvgPool2d
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=4), cls(3, stride=3, ceil_mode=True)).double().eval()
    x = torch.randn(1, 1, 8, 40, dtype=torch.float64)
    assert model(x).shape == (1, 2, 1, 4)
    check_streamed(model, x, tile_size=(11, 23), min_tiles=2)


@pytest.mark.parametrize("pad", [(0, 0, 0, 0), (1, 0, 0, 1)])
def test_inplace_op_after_pad(pad):
    model = FuzzNet(1, [
        ("conv", (0,), dict(cin=1, cout=1, kernel=3, stride=1, padding=0, dilation=1, groups=1, bias=True,
                            mode="zeros")),
        ("pad", (1,), dict(pad=pad, mode="constant", value=0.0)),
        ("act", (2,), dict(name="relu", module=False, inplace=True, form=1)),  # torch.relu_
        ("pad", (1,), dict(pad=pad, mode="constant", value=0.0)),  # reads the conv output again
        ("merge", (3, 4), dict(op="add")),
    ]).double().eval()
    x = torch.randn(1, 1, 30, 30, dtype=torch.float64)
    check_streamed(model, x, tile_size=8, min_tiles=4)


def test_merge_of_different_strides_is_refused():
    # 1x1 conv with stride 2 and a 6x6 valid conv: both 5x5 on a 10x10 image only.
    model = FuzzNet(1, [
        ("conv", (0,), dict(cin=1, cout=1, kernel=1, stride=2, padding=0, dilation=1, groups=1, bias=True,
                            mode="zeros")),
        ("conv", (0,), dict(cin=1, cout=1, kernel=6, stride=1, padding=0, dilation=1, groups=1, bias=True,
                            mode="zeros")),
        ("merge", (1, 2), dict(op="add")),
    ]).double().eval()
    assert model(torch.randn(1, 1, 10, 10, dtype=torch.float64)).shape == (1, 1, 5, 5)
    with pytest.raises(fxstream.FxStreamError):
        fxstream.compile(model, tile_size=64)


def test_read_after_inplace_op():
    # relu_ rewrites all of `a`; the later 3x3 conv must read relu(a) in its halo too.
    model = FuzzNet(1, [
        ("conv", (0,), dict(cin=1, cout=1, kernel=3, stride=1, padding=0, dilation=1, groups=1, bias=True,
                            mode="zeros")),
        ("act", (1,), dict(name="relu", module=True, inplace=True, form=0)),
        ("conv", (1,), dict(cin=1, cout=1, kernel=3, stride=1, padding=1, dilation=1, groups=1, bias=True,
                            mode="zeros")),
        ("merge", (2, 3), dict(op="add")),
    ]).double().eval()
    x = torch.randn(1, 1, 30, 30, dtype=torch.float64)
    check_streamed(model, x, tile_size=10, min_tiles=4)


def test_carry_tile_of_the_stated_minimum_works():
    """Found by the fuzzer: stride 18 x 6 and receptive field 1 x 4 at 50 x 9; the carry error
    stated 19, the smallest working tile is 28 (the cell of a one-pixel block reads 10 pixels
    of the image beyond its stride). The stated minimum must compile and stream exactly."""
    model = (
        FuzzNet(
            1,
            [
                ("fmaxpool", (0,), {"kernel": (1, 1), "stride": 3, "padding": (0, 0), "ceil": False, "dilation": 1}),
                ("act", (0,), {"name": "relu", "module": False, "inplace": False, "form": 0}),
                (
                    "favgpool",
                    (1,),
                    {
                        "kernel": (1, 2),
                        "stride": (3, 1),
                        "padding": (0, 1),
                        "ceil": False,
                        "include_pad": False,
                        "divisor": None,
                    },
                ),
                (
                    "conv",
                    (3,),
                    {
                        "cin": 1,
                        "cout": 1,
                        "kernel": (1, 1),
                        "stride": (1, 1),
                        "padding": "valid",
                        "dilation": (1, 1),
                        "groups": 1,
                        "bias": False,
                        "mode": "zeros",
                    },
                ),
                ("fmaxpool", (4,), {"kernel": (1, 1), "stride": 2, "padding": (0, 0), "ceil": False, "dilation": 1}),
            ],
            None,
            0,
        )
        .double()
        .eval()
    )
    minimum = _carry_minimum(model, (50, 9))
    below = (minimum[0] - 1, max(minimum[1], 16))
    with pytest.raises(fxstream.TileSizeError):
        fxstream.compile(model, below, schedule="carry").shape_plan(50, 9)
    tile = (minimum[0], max(minimum[1], 16))
    x = torch.randn(1, 1, 50, 9, dtype=torch.float64)
    check_streamed(model, x, tile, streamed=fxstream.compile(model, tile, schedule="carry"))
