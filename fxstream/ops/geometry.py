"""Region arithmetic along one spatial axis.

Everything here works on plain ``int`` and on sympy expressions alike: the
planner runs the same formulas symbolically (to derive stride, receptive field,
halos and the block size for a tile size) and concretely (to cut real tiles).
sympy stays inside this module and the planner; the generated code sees ints.

Conventions: intervals are half-open ``[lo, hi)`` in pixel indices of one
tensor along one spatial axis; the image border of that tensor is ``[0, size)``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Union

import sympy

Scalar = Union[int, sympy.Expr]  # noqa: UP007 (runtime alias, Python 3.10)


def smin(x: Scalar, y: Scalar) -> Scalar:
    if isinstance(x, int) and isinstance(y, int):
        return min(x, y)
    return sympy.Min(x, y)


def smax(x: Scalar, y: Scalar) -> Scalar:
    if isinstance(x, int) and isinstance(y, int):
        return max(x, y)
    return sympy.Max(x, y)


@dataclass(frozen=True)
class Interval:
    """Half-open index range ``[lo, hi)``."""

    lo: Scalar
    hi: Scalar

    @property
    def length(self) -> Scalar:
        return self.hi - self.lo

    def hull(self, other: Interval | None) -> Interval:
        if other is None:
            return self
        return Interval(smin(self.lo, other.lo), smax(self.hi, other.hi))

    def is_empty(self) -> bool:
        return self.hi <= self.lo


@dataclass(frozen=True)
class Stencil:
    """How a sliding-window op (conv, pooling, pad) reads one input axis.

    Output index ``i`` reads input indices ``[i*stride - pad_lo, i*stride - pad_lo + extent)``
    where ``extent = dilation*(kernel-1) + 1``. ``pad_lo``/``pad_hi`` is the border
    padding of the original op (negative for cropping pads). ``ceil_mode`` is the
    pooling flag that lets the last window hang over the right padding.
    """

    extent: int
    stride: int = 1
    pad_lo: int = 0
    pad_hi: int = 0
    ceil_mode: bool = False

    def need(self, out: Interval) -> Interval:
        # out block [a, b) reads [a*s - p, (b-1)*s - p + e)
        return Interval(
            out.lo * self.stride - self.pad_lo,
            (out.hi - 1) * self.stride - self.pad_lo + self.extent,
        )

    def read(self, out: Interval, size: int) -> Interval:
        """The input interval (padding positions included) that ``out`` reads."""
        return self.need(out)

    def bound(self, out: Interval) -> Interval:
        """Symbolic form of :meth:`read` for the planner (exact for sliding windows)."""
        return self.need(out)

    def produced(self, raw: Interval, size: int) -> Interval:
        """The output indices the op yields when run without padding on ``raw``."""
        return Interval((raw.lo + self.pad_lo) // self.stride, (raw.hi - self.extent + self.pad_lo) // self.stride + 1)

    def out_size(self, size: int) -> int:
        # torch's pooling_output_shape: floor((n + p_lo + p_hi - e [+ s - 1 if ceil]) / s) + 1;
        # with ceil_mode, a last window that would start inside the right padding is dropped.
        span = size + self.pad_lo + self.pad_hi - self.extent
        if self.ceil_mode:
            span += self.stride - 1
        out = span // self.stride + 1
        if self.ceil_mode and (out - 1) * self.stride >= size + self.pad_lo:
            out -= 1
        return max(out, 0)

    def window_counts(self, block: Interval, size: int, include_pad: bool) -> tuple[int, ...]:
        """Divisor of average pooling for each output index in ``block``.

        count_include_pad=True counts taps inside ``[-pad_lo, size + pad_hi)``
        (the padded image, not the ceil_mode overhang); False counts taps inside
        the image ``[0, size)``. Same rule as torch's avg_pool kernels.
        """
        lo_edge, hi_edge = (-self.pad_lo, size + self.pad_hi) if include_pad else (0, size)
        counts = []
        for i in range(block.lo, block.hi):
            start = i * self.stride - self.pad_lo
            counts.append(max(0, min(start + self.extent, hi_edge) - max(start, lo_edge)))
        return tuple(counts)


IDENTITY = Stencil(extent=1)


# --- Ops with fractional stride -------------------------------------------------------
#
# Each class has the interface of Stencil: ``read`` (exact input interval of an output
# block, given the input size), ``bound`` (a symbolic affine interval containing
# ``read`` at every position and image size, for the shape-independent plan),
# ``out_size`` and ``produced`` (what the op yields on a window, which the generated
# code trims to the node's region).


@dataclass(frozen=True)
class Transposed:
    """One axis of a transposed convolution: input ``j`` adds into outputs
    ``j*stride - pad + t*dilation`` for taps ``t``; ``extent = dilation*(kernel-1) + 1``."""

    extent: int
    stride: int
    pad: int
    output_padding: int = 0

    def read(self, out: Interval, size: int) -> Interval:
        # Inputs that contribute to [a, b): ceil((a+p-e+1)/s) .. floor((b-1+p)/s). The window must
        # also make the padding-free op emit a and b-1, hence the min/max with floor((a+p)/s) and
        # ceil((b-1+p-e+1)/s); the extra inputs only feed outputs outside [a, b).
        s, p, e = self.stride, self.pad, self.extent
        lo = min(-((e - 1 - out.lo - p) // s), (out.lo + p) // s)
        hi = max((out.hi - 1 + p) // s, -((e - out.hi - p) // s)) + 1
        return Interval(lo, hi)

    def bound(self, out: Interval) -> Interval:
        s, p, e = self.stride, self.pad, self.extent
        r = sympy.Rational(1, s)
        return Interval((out.lo + p - max(s, e) + 1) * r, (out.hi + p - 1 + max(s - e, 0)) * r + 1)

    def out_size(self, size: int) -> int:
        return (size - 1) * self.stride - 2 * self.pad + self.extent + self.output_padding

    def produced(self, raw: Interval, size: int) -> Interval:
        return Interval(raw.lo * self.stride - self.pad, (raw.hi - 1) * self.stride - self.pad + self.extent)


@dataclass(frozen=True)
class Shuffle:
    """One axis of ``pixel_shuffle``: output ``i`` comes from input ``i // factor``."""

    factor: int

    def read(self, out: Interval, size: int) -> Interval:
        return Interval(out.lo // self.factor, (out.hi - 1) // self.factor + 1)

    def bound(self, out: Interval) -> Interval:
        r = sympy.Rational(1, self.factor)
        return Interval((out.lo - self.factor + 1) * r, (out.hi - 1) * r + 1)

    def out_size(self, size: int) -> int:
        return size * self.factor

    def produced(self, raw: Interval, size: int) -> Interval:
        return Interval(raw.lo * self.factor, raw.hi * self.factor)


@dataclass(frozen=True)
class Resample:
    """One axis of ``F.interpolate``: every output reads a few input taps with weights.

    ``mode`` is 'nearest', 'nearest-exact', 'linear' or 'cubic'. The output size is
    ``size`` if given, else ``floor(n * scale)``; ``scale`` is passed to the kernel
    unless ``recompute`` is set (then torch recomputes it from the sizes). The taps
    of a whole axis come from :func:`resample_taps`, which follows torch's kernels.
    """

    mode: str
    scale: float | None
    size: int | None = None
    align_corners: bool = False
    recompute: bool = False

    @property
    def kernel_scale(self) -> float | None:
        """The scale factor torch's kernel receives (None: it uses in/out sizes)."""
        return None if self.size is not None or self.recompute else self.scale

    @property
    def ratio(self) -> sympy.Rational:
        """Output pixels per input pixel, for the planner: the scale as a small fraction
        (with size=..., the measured out/in at the planner's reference size)."""
        return sympy.Rational(Fraction(self.scale).limit_denominator(256))

    def out_size(self, size: int) -> int:
        if self.size is not None:
            return self.size
        return math.floor(float(size) * self.scale)

    def read(self, out: Interval, size: int) -> Interval:
        index = resample_taps(self, size)[0]
        lo = min(min(index[i]) for i in range(out.lo, out.hi))
        hi = max(max(index[i]) for i in range(out.lo, out.hi)) + 1
        return Interval(lo, hi)

    def bound(self, out: Interval) -> Interval:
        # Output i reads around source coordinate (i + 1/2)/ratio - 1/2: nearest modes one tap
        # within 1 pixel of i/ratio, linear 2 taps within 3/2, cubic 4 taps within 5/2; 1/4 more
        # absorbs float rounding. When the kernel's scale is (in-1)/(out-1) (align_corners) or
        # in/out (size=, recompute), the source coordinate drifts from i/ratio by up to about 1
        # pixel over the axis when out is within a pixel of in*ratio (sizes that follow the
        # strides). This is a planning bound only: plan_shape checks every tile's real region.
        r = 1 / self.ratio
        half = sympy.Rational(1, 2)
        reach = {"nearest": 1, "nearest-exact": 1, "linear": 1 + half, "cubic": 2 + half}[self.mode] + half / 2
        if self.align_corners or self.kernel_scale is None:
            reach += 1
        return Interval(out.lo * r - reach, out.hi * r + reach)

    def produced(self, raw: Interval, size: int) -> Interval:
        raise NotImplementedError("resampling runs on the exact region (runtime.resample)")


def resample_taps(op: Resample, size: int) -> tuple[tuple, tuple | None]:
    """Per output index of one axis: the input indices it reads and their weights
    (``None`` for nearest modes: one tap of weight 1)."""
    return _resample_taps(op, size)


@functools.lru_cache(maxsize=256)
def _resample_taps(op: Resample, size: int) -> tuple[tuple, tuple | None]:
    out = op.out_size(size)
    if op.mode in ("nearest", "nearest-exact"):
        # The index rule is discontinuous, so ask torch's own kernel: interpolate a ramp.
        import torch
        import torch.nn.functional as F

        ramp = torch.arange(size, dtype=torch.float64).view(1, 1, size)
        kwargs = dict(size=out) if op.kernel_scale is None else dict(scale_factor=op.scale)
        src = F.interpolate(ramp, mode=op.mode, **kwargs).view(-1).tolist()
        if len(src) != out:
            raise ValueError(f"interpolate gave {len(src)} outputs, expected {out}")
        return tuple((int(v),) for v in src), None
    scale = _source_scale(op, size, out)
    index, weight = [], []
    for i in range(out):
        src = scale * i if op.align_corners else scale * (i + 0.5) - 0.5
        if op.mode == "linear":
            src = max(src, 0.0) if not op.align_corners else src
            i0 = min(math.floor(src), size - 1)
            lam = min(max(src - i0, 0.0), 1.0)
            i1 = i0 + (1 if i0 < size - 1 else 0)
            index.append((i0, i1))
            weight.append((1.0 - lam, lam))
        else:  # cubic, torch's A = -0.75, taps clamped to the image
            i0 = min(math.floor(src), size - 1)
            t = min(max(src - i0, 0.0), 1.0)
            index.append(tuple(min(max(i0 - 1 + k, 0), size - 1) for k in range(4)))
            weight.append(_cubic_weights(t))
    return tuple(index), tuple(weight)


def _source_scale(op: Resample, size: int, out: int) -> float:
    if op.align_corners:
        return (size - 1) / (out - 1) if out > 1 else 0.0
    if op.kernel_scale is not None and op.kernel_scale > 0:
        return 1.0 / op.kernel_scale
    return size / out


def _cubic_weights(t: float, a: float = -0.75) -> tuple[float, float, float, float]:
    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


def border_index(j: int, size: int, fill: str) -> int:
    """The in-image index that position ``j`` of a padded axis reads ('reflect' mirrors
    about the edge pixels, as F.pad does; 'replicate' repeats them)."""
    if fill == "reflect":
        return -j if j < 0 else (2 * (size - 1) - j if j >= size else j)
    return min(max(j, 0), size - 1)


def source_interval(raw: Interval, size: int, fill: str) -> Interval:
    """The in-image indices that a window over ``raw`` reads, for a border ``fill``.

    'constant' reads only the in-image part; 'reflect' and 'replicate' also read the
    indices that the positions outside the image map to (see :func:`border_index`).
    """
    lo, hi = raw.lo, raw.hi
    inside = Interval(max(lo, 0), min(hi, size))
    if fill == "constant" or (lo >= 0 and hi <= size):
        return inside
    parts = [inside] if not inside.is_empty() else []
    if lo < 0:
        outside = [border_index(j, size, fill) for j in range(lo, min(hi, 0))]
        parts.append(Interval(min(outside), max(outside) + 1))
    if hi > size:
        outside = [border_index(j, size, fill) for j in range(max(lo, size), hi)]
        parts.append(Interval(min(outside), max(outside) + 1))
    result = parts[0]
    for part in parts[1:]:
        result = result.hull(part)
    return result


# --- Symbolic composition -------------------------------------------------------
#
# For each node, the map from an output block [a, b) of that node to the image
# region it depends on, ignoring the image border (interior tiles). For local ops
# and integer strides these are exact and affine: lo(a) = S*a - L, hi(b) = S*b + R.
# Upsampling, transposed convolution and pixel shuffle make S rational; their
# regions involve floor/ceiling, and the maps hold affine bounds that contain the
# exact region everywhere (the per-shape tiling in planning/plan.py is always exact).

A, B = sympy.symbols("a b", integer=True)


@dataclass(frozen=True)
class AxisMap:
    """Image region ``[lo(a), hi(b))`` needed by the block ``[a, b)`` of one node."""

    lo: sympy.Expr
    hi: sympy.Expr

    @staticmethod
    def identity() -> AxisMap:
        return AxisMap(A, B)

    def through(self, stencil: Stencil) -> AxisMap:
        """The map of a consumer that reads this node through ``stencil``."""
        raw = stencil.bound(Interval(A, B))
        return AxisMap(self.lo.subs(A, raw.lo), self.hi.subs(B, raw.hi))

    def hull(self, other: AxisMap | None) -> AxisMap:
        if other is None:
            return self
        return AxisMap(sympy.Min(self.lo, other.lo), sympy.Max(self.hi, other.hi))

    @property
    def stride(self) -> sympy.Expr:
        """Image pixels per output pixel (cumulative stride)."""
        return sympy.simplify(self.lo.subs(A, A + 1) - self.lo)

    @property
    def receptive_field(self) -> sympy.Expr:
        return sympy.simplify(self.hi.subs(B, A + 1) - self.lo)

    @property
    def halo(self) -> tuple[sympy.Expr, sympy.Expr]:
        """Extra image pixels left and right of the block's own ``[S*a, S*b)``."""
        stride = self.stride
        return sympy.simplify(stride * A - self.lo), sympy.simplify(self.hi - stride * B)


def as_number(value: sympy.Expr, what: str) -> int | float:
    """A constant: an int when integral (strides), else a float (e.g. 0.5 after upsampling)."""
    value = sympy.simplify(value)
    if value.free_symbols:
        raise ValueError(f"{what} is not a constant: {value}")
    return int(value) if value.is_integer else float(value)


def ceil_int(value: sympy.Expr, what: str) -> int:
    """A constant rounded up (receptive field and halos are upper bounds when the trunk upsamples)."""
    value = sympy.simplify(value)
    if value.free_symbols:
        raise ValueError(f"{what} is not a constant: {value}")
    return int(sympy.ceiling(value))


def as_int(value: sympy.Expr, what: str) -> int:
    """Convert a sympy result to int, or explain why the geometry is not affine."""
    value = sympy.simplify(value)
    if value.free_symbols or not value.is_integer:
        raise ValueError(f"{what} is not a constant integer: {value}")
    return int(value)


def block_for_tile(axis: AxisMap, tile: int) -> int:
    """Largest output block whose input region fits in ``tile`` pixels.

    The region of block [a, a+n) has width hi(a+n) - lo(a) = S*n + (L + R);
    solve S*n + L + R <= tile for the largest integer n.
    """
    n = sympy.Symbol("n", integer=True, positive=True)
    width = sympy.simplify(sympy.expand(axis.hi.subs(B, A + n) - axis.lo))
    if width.has(A):
        raise ValueError(f"tile width depends on the tile position: {width}")
    slope = width.coeff(n)
    offset = sympy.expand(width - slope * n)
    return as_int(sympy.floor((tile - offset) / slope), "block size")
