"""Fast ``width(lo, hi)`` for the per-axis splits of both schedules.

The splits (:func:`fxstream.planning.plan.fitted_split`) binary-search block lengths, so they call
``width(lo, hi)`` - the extent of the image region that the trunk-output block ``[lo, hi)``
reads along one axis - tens of thousands of times per axis, and each call of the plain
function is a full region walk. :func:`recompute_width` and :func:`carry_width` wrap the
plain function: inside an *interior zone* the width is a closed form, elsewhere (near the
image borders) the plain function answers, memoised. The results are identical.

**Why a closed form.** When every spatial op of the trunk is a plain ``geometry.Stencil``
(integer stride; resolved for this size), the walk maps each endpoint of an interval
affinely: a stencil ``(extent e, stride s, pad p)`` reads ``[lo*s - p, (hi-1)*s - p + e)``,
and a hull of intervals is the min of their ``lo`` and the max of their ``hi``. As long as
nothing is clipped - no window leaves ``[0, n)`` of its producer (``source_interval`` is
then the identity, also for reflect/replicate fills), and no interval is empty (so
``_non_empty`` does nothing) - every node's ``lo`` is ``M*lo + a`` and its ``hi`` is
``M*hi + b``, with ``M`` the product of the strides down to the output (the same on every
path, or there is no closed form) and ``a``/``b`` the min/max over paths. Each "not
clipped" condition is ``low <= M*x + c <= high`` for ``x`` the block's ``lo`` or ``hi``:
a range of ``x``, since ``M > 0``. The zone is the intersection of those ranges; inside
it the image region is ``[M*lo + a, M*hi + b)``, so ``width = M*(hi - lo) + (b - a)``.
Intervals cannot be empty there: a stencil's extent is at least 1, so a non-empty
interval reads a non-empty one.

The carry width (:func:`fxstream.planning.tiling._carry_width`) is the image region of cell 0 for
the output boundaries ``[lo, hi]``: each boundary ``x`` maps to ``M_v*x + c_v`` at every
node ``v`` (the max over consumers of where their last output's window ends), then the
image's consumers read their cells. Its zone adds the conditions of
:func:`fxstream.planning.tiling.cell_boundaries`: the boundary inside ``(0, n_out)``, every
consumer's boundary positive, every window end inside ``[0, n]`` (with a reflect or
replicate fill: past the mirrored left padding, which then never decides the end).

With several trunk outputs (``TrunkGeometry.outputs``) the walk starts from every output's
block aligned with the primary's (``plan.aligned``); the closed form needs every output of
the primary's size along the axis, where the aligned block is the block itself.

Steps with any other axis op (``Transposed``, ``Shuffle``, ``Resample``), unresolved
dynamic steps, or merges of different strides have no zone: every call walks. Negative
pads (crops) are plain stencils and fit the closed form.

:func:`cached_split` memoises whole splits by an axis signature (:func:`axis_key`): both
axes of a square input with the same stencils, and the repeated tilings of one input
size (report, memory model, stripe store), share one split.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable

from ..ops import geometry as g
from .trunk import TrunkGeometry

Width = Callable[[int, int], int]
Form = tuple[int, int]  # (M, c): the value M*x + c for a block endpoint x


@dataclasses.dataclass(frozen=True)
class Interior:
    """``width(lo, hi) = slope * (hi - lo) + offset`` for ``lo`` in ``[lo_min, lo_max]`` and
    ``hi`` in ``[hi_min, hi_max]`` (and ``lo < hi``)."""

    slope: int
    offset: int
    lo_min: int
    lo_max: int
    hi_min: int
    hi_max: int

    def contains(self, lo: int, hi: int) -> bool:
        return self.lo_min <= lo < hi and lo <= self.lo_max and self.hi_min <= hi <= self.hi_max

    def width(self, lo: int, hi: int) -> int:
        return self.slope * (hi - lo) + self.offset


class FastWidth:
    """``width(lo, hi)``: the closed form inside ``interior``, else ``plain`` (memoised).
    ``key`` (hashable or None) names the function for :func:`cached_split`. Before its first
    use the closed form is checked against ``plain`` at a few blocks of the zone (a guard
    against the walk and this module drifting apart); on a mismatch it is dropped."""

    def __init__(self, plain: Width, interior: Interior | None, key: Hashable | None = None):
        self.plain, self.key = plain, key
        self.interior: Interior | None = None
        self.walks = 0  # calls of ``plain`` (for tests and profiling)
        self._memo: dict = {}
        self._unchecked = interior
        self._zone = (0, 0, 1, 0, 0, 0)  # astuple(interior) once checked; until then an empty zone

    def __call__(self, lo: int, hi: int) -> int:
        slope, offset, lo_min, lo_max, hi_min, hi_max = self._zone
        if lo_min <= lo < hi and lo <= lo_max and hi_min <= hi <= hi_max:
            return slope * (hi - lo) + offset
        if self._unchecked is not None:
            self._check(self._unchecked)
            return self(lo, hi)
        value = self._memo.get((lo, hi))
        if value is None:
            self.walks += 1
            value = self._memo[(lo, hi)] = self.plain(lo, hi)
        return value

    def _check(self, interior: Interior) -> None:
        self._unchecked = None
        middle = (interior.lo_min + interior.hi_max) // 2
        probes = [(interior.lo_min, interior.lo_min + 1), (interior.lo_min, interior.hi_max)]
        probes += [(interior.hi_max - 1, interior.hi_max), (middle, middle + 1), (interior.hi_min - 1, interior.hi_min)]
        for lo, hi in probes:
            if interior.contains(lo, hi):
                self.walks += 1
                if self.plain(lo, hi) != interior.width(lo, hi):
                    return
        self.interior = interior
        self._zone = dataclasses.astuple(interior)


class _Zone:
    """The ranges of the block's ``lo`` and ``hi`` where no condition is violated."""

    def __init__(self, n_out: int):
        self.ranges = {"lo": [0, n_out], "hi": [0, n_out]}

    def require(self, var: str, form: Form, low: int | None = None, high: int | None = None) -> None:
        """``low <= M*x + c <= high`` for ``x`` the endpoint ``var`` (``M > 0``)."""
        slope, offset = form
        bounds = self.ranges[var]
        if low is not None:
            bounds[0] = max(bounds[0], -((offset - low) // slope))  # ceil((low - c) / M)
        if high is not None:
            bounds[1] = min(bounds[1], (high - offset) // slope)

    def interior(self, slope: int, offset: int) -> Interior | None:
        (lo_min, lo_max), (hi_min, hi_max) = self.ranges["lo"], self.ranges["hi"]
        if lo_min > lo_max or hi_min > hi_max:
            return None
        return Interior(slope, offset, lo_min, lo_max, hi_min, hi_max)


def _stencil(step, axis: int) -> g.Stencil | None:
    """The step's plain stencil along ``axis`` (identity for a local op), or None when it has none."""
    if step.resolve is not None:
        return None
    if not step.stencils:
        return g.IDENTITY
    op = step.stencils[axis]
    return op if type(op) is g.Stencil and op.extent >= 1 and op.stride >= 1 else None


def _reads(stencil: g.Stencil, lo: Form, hi: Form) -> tuple[Form, Form]:
    """The forms of the window ``[lo*s - p, (hi-1)*s - p + e)`` read by ``[lo, hi)``."""
    s, p, e = stencil.stride, stencil.pad_lo, stencil.extent
    return (s * lo[0], s * lo[1] - p), (s * hi[0], s * (hi[1] - 1) - p + e)


def _hull(old: tuple[Form, Form] | None, new: tuple[Form, Form]) -> tuple[Form, Form] | None:
    """Min of the ``lo`` forms and max of the ``hi`` forms; None if the slopes differ."""
    if old is None:
        return new
    if old[0][0] != new[0][0] or old[1][0] != new[1][0]:
        return None
    return (old[0][0], min(old[0][1], new[0][1])), (old[1][0], max(old[1][1], new[1][1]))


def _outputs(geo: TrunkGeometry, sizes: dict, axis: int) -> tuple[str, ...] | None:
    """The trunk outputs, or None unless all have the primary output's size along ``axis``:
    only then is every output's block (``plan.aligned``) the primary block itself."""
    outputs = getattr(geo, "outputs", None) or (geo.output,)
    n_out = sizes[geo.output][axis]
    return outputs if all(sizes[o][axis] == n_out for o in outputs) else None


def recompute_interior(geo: TrunkGeometry, sizes: dict, axis: int) -> Interior | None:
    """The interior zone of the recompute width (``plan._axis_width``), or None."""
    outputs = _outputs(geo, sizes, axis)
    if outputs is None:
        return None
    zone = _Zone(sizes[geo.output][axis])
    need: dict = {o: ((1, 0), (1, 0)) for o in outputs}
    for step in reversed(geo.steps):
        if step.name not in need:
            continue
        stencil = _stencil(step, axis)
        if stencil is None:
            return None
        for producer in step.inputs:
            lo, hi = _reads(stencil, *need[step.name])
            zone.require("lo", lo, low=0)
            zone.require("hi", hi, high=sizes[producer][axis])
            need[producer] = _hull(need.get(producer), (lo, hi))
            if need[producer] is None:
                return None
    if geo.image not in need:
        return None
    (slope, a), (_, b) = need[geo.image]
    return zone.interior(slope, b - a)


def carry_interior(geo: TrunkGeometry, sizes: dict, axis: int) -> Interior | None:
    """The interior zone of the carry width (``tiling._carry_width``), or None."""
    outputs = _outputs(geo, sizes, axis)
    if not geo.steps or geo.steps[-1].name != geo.output or outputs is None:
        return None
    n_out = sizes[geo.output][axis]
    zone = _Zone(n_out)
    for var in ("lo", "hi"):
        zone.require(var, (1, 0), low=1, high=n_out - 1)
    bounds = _boundary_forms(geo, sizes, axis, zone, outputs)
    if bounds is None:
        return None
    region = None
    for step in geo.steps:  # the image's consumers read their cells [B(lo), B(hi))
        if geo.image not in step.inputs:
            continue
        form = bounds[step.name]
        lo, hi = _reads(_stencil(step, axis), form, form)
        zone.require("lo", lo, low=0)
        zone.require("hi", hi, high=sizes[geo.image][axis])
        region = _hull(region, (lo, hi))
        if region is None:
            return None
    if region is None:
        return None
    (slope, a), (_, b) = region
    return zone.interior(slope, b - a)


def _boundary_forms(geo: TrunkGeometry, sizes: dict, axis: int, zone: _Zone, outputs: tuple) -> dict | None:
    """Node -> the form of its cell boundary for an output boundary ``x`` (both the block's
    ``lo`` and ``hi``), adding to ``zone`` the conditions under which it holds. A trunk
    output's boundary is at least its aligned block's, here ``x`` itself."""
    consumers: dict = {}
    for step in geo.steps:
        if _stencil(step, axis) is None:
            return None
        for producer in step.inputs:
            consumers.setdefault(producer, []).append(step)
    forms: dict = {geo.output: (1, 0)}
    for name in [s.name for s in reversed(geo.steps)][1:] + [geo.image]:
        ends = [(1, 0)] if name in outputs else []
        for w in consumers.get(name, ()):
            _, end = _reads(_stencil(w, axis), forms[w.name], forms[w.name])
            first = 0 if w.fill == "constant" else abs(_stencil(w, axis).pad_lo) + 1
            for var in ("lo", "hi"):
                zone.require(var, forms[w.name], low=1)  # the consumer's boundary is positive
                zone.require(var, end, low=first, high=sizes[name][axis])
            ends.append(end)
        if not ends or len({slope for slope, _ in ends}) > 1:
            return None
        forms[name] = (ends[0][0], max(offset for _, offset in ends))
    return forms


def recompute_width(plain: Width, geo: TrunkGeometry, sizes: dict, axis: int) -> FastWidth:
    """``plain`` (``plan._axis_width``) with the closed form of its interior zone."""
    return FastWidth(plain, recompute_interior(geo, sizes, axis), axis_key("recompute", geo, sizes, axis))


def carry_width(plain: Width, geo: TrunkGeometry, sizes: dict, axis: int) -> FastWidth:
    """``plain`` (``tiling._carry_width``) with the closed form of its interior zone."""
    return FastWidth(plain, carry_interior(geo, sizes, axis), axis_key("carry", geo, sizes, axis))


def axis_key(kind: str, geo: TrunkGeometry, sizes: dict, axis: int) -> Hashable:
    """Everything a width along ``axis`` reads: the trunk's structure and fills, each step's
    axis op along ``axis`` and each node's size along it. Two axes (or two tilings) with the
    same key have the same width function."""
    steps = tuple(
        (s.name, s.kind, s.inputs, s.fill, s.stencils[axis] if s.stencils else None, s.resolve is None)
        for s in geo.steps
    )
    outputs = getattr(geo, "outputs", None) or (geo.output,)
    sized = tuple((name, size[axis]) for name, size in sizes.items())
    return kind, geo.image, geo.output, outputs, geo.slots, steps, sized


_SPLITS: OrderedDict = OrderedDict()
_SPLITS_LOCK = threading.Lock()
SPLIT_CACHE_SIZE = 64


def cached_split(width: Width, n: int, limit: int, split: Callable[[], list | None]) -> list | None:
    """``split()``, memoised by ``(width.key, n, limit)`` when ``width`` has a key (the
    ``SPLIT_CACHE_SIZE`` most recent). Callers get a copy of the list."""
    key = getattr(width, "key", None)
    if key is None:
        return split()
    key = (key, n, limit)
    with _SPLITS_LOCK:
        found = key in _SPLITS
        if found:
            _SPLITS.move_to_end(key)
            value = _SPLITS[key]
    if not found:
        value = split()
        with _SPLITS_LOCK:
            _SPLITS[key] = value
            while len(_SPLITS) > SPLIT_CACHE_SIZE:
                _SPLITS.popitem(last=False)
    return None if value is None else list(value)


def widest_unit_block(width: Width, n: int) -> int:
    """The largest ``width(s, s + 1)`` over ``s`` in ``[0, n)``: the smallest limit that
    :func:`fxstream.plan.fitted_split` can meet. (A block's region holds the regions of its
    one-pixel blocks, so a split fails exactly when one of them does not fit.) Inside the
    interior zone of a :class:`FastWidth` the one-pixel width is constant, so only the
    border zones are walked."""
    width(0, 1)  # a FastWidth checks its closed form on first use
    interior = getattr(width, "interior", None)
    inner = range(0)
    if interior is not None:  # (s, s + 1) lies in the zone for s in this range
        inner = range(max(interior.lo_min, interior.hi_min - 1), min(interior.lo_max, interior.hi_max - 1, n - 1) + 1)
    starts = [*range(inner.start), inner.start, *range(inner.stop, n)] if len(inner) else range(n)
    return max(width(s, s + 1) for s in starts)
