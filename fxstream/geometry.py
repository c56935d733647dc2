"""Region arithmetic along one spatial axis.

Everything here works on plain ``int`` and on sympy expressions alike: the
planner runs the same formulas symbolically (to derive stride, receptive field,
halos and the block size for a tile size) and concretely (to cut real tiles).
sympy stays inside this module and the planner; the generated code sees ints.

Conventions: intervals are half-open ``[lo, hi)`` in pixel indices of one
tensor along one spatial axis; the image border of that tensor is ``[0, size)``.
"""

from __future__ import annotations

from dataclasses import dataclass
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
# and integer strides these are affine: lo(a) = S*a - L, hi(b) = S*b + R.

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
        raw = stencil.need(Interval(A, B))
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
    width = sympy.expand(axis.hi.subs(B, A + n) - axis.lo)
    if width.has(A):
        raise ValueError(f"tile width depends on the tile position: {width}")
    slope = width.coeff(n)
    offset = sympy.expand(width - slope * n)
    return as_int(sympy.floor((tile - offset) / slope), "block size")
