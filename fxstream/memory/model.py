"""Predictive memory model: peak bytes of one step, streamed and plain, from the plan.

Inputs: the trunk geometry and plan (regions in pixels), the per-node statistics of
:mod:`fxstream.memory.nodestats` (bytes per pixel, which storages autograd saves and for which
node) and the parameter sizes. For a tile whose nodes compute regions of ``px[m]``
pixels (batch N):

    act[m]        = N * bytes_per_pixel[m] * px[m]           (one storage per view family)
    copy[c]       = padded copy of the window a conv/pool c reads, in border tiles only
                    (the runtime pads explicitly where a window leaves the image)
    tile forward  = max over the execution order of the live activations (+ copy[c])
    tile saved    = saved storages + saved copies + saved extras (max-pooling indices);
                    a consumer that gets a copy saves the copy, not its producer's output
    tile backward = max over m of (saved storages of the nodes up to m)
                    + act[m] + sum of act[producers of m]     (gradient buffers of node m)

and the step's peak is the largest of its phases (``resident`` = parameters, buffers and
the input image, all on the device):

    forward   = resident + S + O + tile forward                      (O: trunk output)
    head      = resident + S + K + O + H + G + head grads    (H: head activations, if measured)
    rest      = resident + S + K + O + rest backward + head grads    (plain remainder, if any)
    backward  = resident + S + P + G + trunk grads * 2 + head grads + tile backward

``G`` is the gradient of the trunk output. ``K`` is the last tile's saved tensors: the
executor keeps that tile's graph from the forward pass to the backward pass. Under the
carry schedule, ``S`` is the stripe store (every stripe, kept for the backward pass) and
``P`` the pending gradients, bounded by the stripes one row of tiles reads
(:meth:`MemoryModel.row_stripe_bytes`); both are 0 under recompute. Trunk parameter
gradients count twice: the runtime keeps a running sum and a fresh per-tile buffer.
Back-propagation runs in reverse order and frees a node's saved tensors as it passes, so
at node m only the saved storages of nodes up to m are alive (a slight over-estimate: a
storage is freed once its last saver has run). A plain (unstreamed) step is the same model with the whole image as one
region, no copies and no stripes: ``resident + backward + grads``.

:meth:`MemoryModel.estimate` evaluates every distinct tile of the tiling exactly. In an
interior tile the region of node m is affine in the output block n per axis,
``a_m * n + b_m``, and ``n = floor((t - L - R) / S)`` for a tile edge ``t``, so
:meth:`MemoryModel.peak_expr` is a sympy expression in ``t``: the interior regions
clipped to the image's node sizes, with a border copy for every padded window. It bounds
every tile from above (by up to ~20% in the tests). ``H``, the head's saved tensors plus its
largest tensor, comes from :class:`fxstream.memory.nodestats.HeadFit` (two probe sizes, linear in
the input's pixels). Not modelled: allocator caching and fragmentation; convolution
workspaces (on CPU, PyTorch runs a convolution with kernels up to 3 at batch 1 through
im2col when the product of its input's first four dims is at most 20480, e.g. a 3-D conv
with ``C * D * H <= 20480``: ``C_in * prod(k)`` values per output pixel while it runs,
several times the tile's activations; ``torch._C._select_conv_backend`` tells which);
and a loss computed outside the model (on a dense output it holds a few maps of the
output's size; put it in the model to have it counted with the head).
Measured against this model: tests/test_memory_truth.py.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import NamedTuple

import sympy
import torch
import torch.fx as fx

from ..analysis.analyze import Analysis
from ..errors import InputShapeError
from ..ops.windows import kinds_with
from ..planning.plan import Plan, node_regions, node_sizes
from ..planning.schedule import Schedule, as_schedule
from ..planning.tiling import ShapePlan, plan_shape
from ..planning.trunk import TrunkGeometry
from .nodestats import TrunkStats

# Window ops whose input window is a padded copy at the image border (a 'pad' node's
# copy is its own output), those that keep that copy for the backward pass, and those that
# copy a cropped window into a contiguous buffer (see fxstream.ops.windows).
COPIES_WINDOW = kinds_with("copies_window")
SAVES_INPUT = kinds_with("saves_input")
CONTIGUOUS_INPUT = kinds_with("contiguous_input")

# Where the parts of a prediction live on an accelerator: the input is host-resident (or read
# lazily) and its gradient is assembled next to it; the "host" placement's stripe store. With
# output_device="cpu", the trunk outputs, their gradients and what runs on them (the head, a
# plain rest of the trunk) are on the host too. Everything else is on the compute device.
HOST_PARTS = frozenset({"input", "input grad", "stripe store (host)"})
OUTPUT_PARTS = frozenset({"trunk output", "trunk output grad", "head activations", "head param grads", "rest backward"})


@dataclass(frozen=True)
class ParamBytes:
    """Bytes of the model's tensors: trainable parameters used by the streamed trunk,
    other trainable parameters (the head), and everything without a gradient (buffers,
    frozen parameters)."""

    trunk: int
    head: int
    frozen: int


def parameter_bytes(analysis: Analysis, streamed: set, itemsize: int) -> ParamBytes:
    """Split the model's tensors into trainable parameters of the ``streamed`` nodes
    (names), other trainable parameters, and tensors without a gradient; floating
    tensors count at ``itemsize`` bytes per element."""
    gm = analysis.gm
    used: set = set()
    for node in analysis.gm.graph.nodes:
        if node.op == "call_module" and node.name in streamed:
            used |= {id(p) for p in gm.get_submodule(node.target).parameters()}
        elif node.op == "get_attr" and _feeds(node, streamed):
            value = _attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                used.add(id(value))
    size = lambda t: t.numel() * (itemsize if t.is_floating_point() else t.element_size())  # noqa: E731
    trunk = head = frozen = 0
    for p in gm.parameters():
        if not p.requires_grad:
            frozen += size(p)
        elif id(p) in used:
            trunk += size(p)
        else:
            head += size(p)
    frozen += sum(size(b) for b in gm.buffers())
    return ParamBytes(trunk, head, frozen)


def _feeds(node: fx.Node, streamed: set) -> bool:
    """Whether ``node`` (a parameter) reaches a streamed node through its users."""
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        if n.name in streamed:
            return True
        if n in seen or n.op == "output":
            continue
        seen.add(n)
        stack.extend(n.users)
    return False


def _attr(gm: fx.GraphModule, target: str):
    value = gm
    for atom in target.split("."):
        value = getattr(value, atom)
    return value


@dataclass(frozen=True)
class Peak:
    """A predicted peak: total bytes, the phase it happens in and its parts.

    ``device``/``host``: the peaks of the parts that live on the compute device and in
    host memory (each over all phases: they may fall in other phases than the total's), for
    a streamed step; None for a plain one. On a CPU compute device every part is on the
    "device" (one memory): ``device.total == total`` and ``host.total == 0``."""

    total: int
    phase: str
    parts: dict = field(default_factory=dict)
    device: Peak | None = None
    host: Peak | None = None

    def to_dict(self) -> dict:
        result = {"bytes": self.total, "phase": self.phase, "parts": dict(self.parts)}
        for where, peak in (("device", self.device), ("host", self.host)):
            if peak is not None:
                result[f"{where}_bytes"] = peak.total
                result[f"{where}_phase"] = peak.phase
                result[f"{where}_parts"] = dict(peak.parts)
        return result


@dataclass(frozen=True)
class Estimate:
    """Predicted peaks of one step for one input shape and tile size."""

    streamed_training: Peak
    streamed_inference: Peak
    plain_training: Peak
    plain_inference: Peak

    def to_dict(self) -> dict:
        return {
            "streamed": {"training": self.streamed_training.to_dict(), "inference": self.streamed_inference.to_dict()},
            "plain": {"training": self.plain_training.to_dict(), "inference": self.plain_inference.to_dict()},
        }


class MemoryModel:
    """Memory of a streamed step. ``rest`` names trunk nodes after the streamed output
    that run with plain autograd (a streamed prefix, see :mod:`fxstream.memory.auto`)."""

    def __init__(
        self,
        geo: TrunkGeometry,
        plan: Plan,
        stats: TrunkStats,
        params: ParamBytes,
        batch: int,
        trunk: TrunkGeometry | None = None,
        input_grad: bool = False,
        schedule: Schedule | None = None,
        shape_plans: Callable[[tuple[int, ...]], ShapePlan] | None = None,
        device: str = "cpu",
        output_device: str | None = None,
    ):
        """``geo``/``plan``: the streamed part. ``trunk``: the whole local trunk when
        ``geo`` is a prefix of it; its nodes after ``geo.output`` run with plain autograd.
        ``shape_plans``: input size -> the tiling of ``geo`` under ``schedule`` (default
        ``tiling.plan_shape``; e.g. a compiled trunk's cached ``shape_plan``).

        ``device``: the type of the compute device ('cpu', 'cuda', ...). On an accelerator
        the input is host-resident (or read lazily), the stripes live where
        ``schedule.placement(device)`` says, and ``output_device="cpu"`` puts the trunk
        output, its gradient and the head in host memory; on a CPU every part is in the
        one memory (see :class:`Peak`)."""
        self.geo, self.plan, self.params, self.batch = geo, plan, params, batch
        self.input_grad = input_grad
        self.schedule = as_schedule(schedule)
        self.accelerator = torch.device(device).type != "cpu"
        self.placement = self.schedule.placement(torch.device(device).type)  # None under recompute
        self.output_on_host = (
            self.accelerator and output_device is not None and torch.device(output_device).type == "cpu"
        )
        self.trunk = trunk or geo
        by_name = stats.by_name()
        streamed = [geo.image] + [s.name for s in geo.steps]
        self.stats = [by_name[n] for n in streamed]
        self.rest_stats = [by_name[s.name] for s in self.trunk.steps if s.name not in set(streamed)]
        self.const_saved = stats.const_saved_bytes
        self.head = stats.head  # the head's activations (nodestats.HeadFit), or None: not counted
        self.inputs = {s.name: s.inputs for s in self.trunk.steps}
        self.kinds = {s.name: s.kind for s in self.trunk.steps}
        self._bpp = {s.name: s.bytes_per_pixel for s in stats.nodes}
        self.padded = [s.name for s in geo.steps if s.kind in COPIES_WINDOW and _has_padding(s)]
        self._affine = _interior_affine(geo, plan)
        self._tile_shapes: dict = {}
        self._shape_plans = shape_plans or (lambda size: plan_shape(geo, plan, size, self.schedule))

    def tile_shapes(self, input_size: tuple[int, ...]) -> list:
        """:func:`tile_pixels` of the plan's tiling of ``input_size`` (cached)."""
        key = tuple(input_size)
        if key not in self._tile_shapes:
            self._tile_shapes[key] = tile_pixels(self.geo, self.plan, key, self.schedule, self._shape_plan(key))
        return self._tile_shapes[key]

    def _shape_plan(self, input_size: tuple[int, ...]) -> ShapePlan:
        """The schedule's tiling of ``input_size`` (cached: the tile shapes and the stripe store share it)."""
        key = ("shape plan", tuple(input_size))
        if key not in self._tile_shapes:
            self._tile_shapes[key] = self._shape_plans(tuple(input_size))
        return self._tile_shapes[key]

    # --- tile terms (ints or sympy) ---

    def tile_terms(
        self, px: dict, copies: dict | None = None, stats: list | None = None, views: dict | None = None
    ) -> dict:
        """The per-tile parts for region sizes ``px`` (node -> pixels) of the streamed
        nodes (or of ``stats``, e.g. the whole trunk at full size). ``copies``: consumer
        -> pixels of the padded copy of its input window made at the image border;
        ``views``: conv -> pixels of the contiguous copy of a cropped input window."""
        stats = stats or self.stats
        act = {s.name: self.batch * s.bytes_per_pixel * px[s.name] for s in stats}
        copy = {c: self.batch * self._bpp[self.inputs[c][0]] * n for c, n in (copies or {}).items()}
        saved_copy = {c: v for c, v in copy.items() if self.kinds[c] in SAVES_INPUT}
        transient = dict(copy)
        for c, n in (views or {}).items():
            transient[c] = transient.get(c, 0) + self.batch * self._bpp[self.inputs[c][0]] * n
        return {
            "tile forward": _forward_peak(stats, act, transient),
            "tile saved": _saved(stats, act, px, self.batch, saved_copy) + self.const_saved,
            "tile backward": _backward_peak(stats, act, px, self.batch, self.inputs, saved_copy) + self.const_saved,
        }

    def interior_views(self, px: dict) -> dict:
        """Contiguous copies an upper-bound tile makes: one per convolution whose producer
        has other consumers (its window may be a crop of the producer's region)."""
        readers: dict = {}
        for step in self.geo.steps:
            for producer in step.inputs:
                readers[producer] = readers.get(producer, 0) + 1
        return {
            s.name: px[s.inputs[0]]
            for s in self.geo.steps
            if s.kind in CONTIGUOUS_INPUT and readers.get(s.inputs[0], 0) > 1
        }

    def interior_copies(self, px: dict) -> dict:
        """Padded copies an upper-bound tile makes: one per padded window op, of the size
        of its producer's region (interior tiles make none, border tiles some)."""
        return {c: px[self.inputs[c][0]] for c in self.padded}

    def interior_pixels(self, tile: tuple, sizes: dict | None = None) -> dict:
        """node -> pixels of an interior tile of edge ``tile`` (ints or sympy symbols),
        clipped to the node sizes ``sizes`` of an image when given."""
        px = {}
        blocks = [block_for(self.plan, axis, t) for axis, t in enumerate(tile)]
        for name, per_axis in self._affine.items():
            lengths = [a * n + b for (a, b), n in zip(per_axis, blocks)]
            if sizes is not None:
                lengths = [sympy.Min(v, size) for v, size in zip(lengths, sizes[name])]
            px[name] = sympy.Mul(*lengths)
        return px

    # --- whole-step predictions ---

    def resident(self, input_size: tuple[int, ...]) -> dict:
        """Parameters, buffers and the input (and its gradient): alive in every phase of a
        step, streamed or plain."""
        image = self.batch * self.stats[0].bytes_per_pixel * math.prod(input_size)
        parts = {"parameters": self.params.trunk + self.params.head + self.params.frozen, "input": image}
        if self.input_grad:
            parts["input grad"] = image
        return parts

    def stripe_bytes(self, input_size: tuple[int, ...]) -> int:
        """Bytes of every stripe of the carry schedule's tiling of ``input_size`` (0 under
        recompute): the store of the ``"device"`` and ``"host"`` placements."""
        if not self.schedule.carries:
            return 0
        key = ("stripes", tuple(input_size))
        if key not in self._tile_shapes:
            shape = self._shape_plan(input_size)
            self._tile_shapes[key] = sum(self.batch * self._bpp[name] * px for name, px in shape.stripe_pixels)
        return self._tile_shapes[key]

    def row_stripe_bytes(self, input_size: tuple[int, ...]) -> int:
        """Bytes of the stripes that the tiles of one block row (along the first axis) read,
        at the largest row (0 under recompute): a bound on the pending gradients of the
        backward pass, and on the stripes a forward pass keeps for its later tiles (the
        rolling window).

        At the backward pass's tile ``i``, the pending gradients are those of the stripes
        that tiles after ``i`` read from tiles up to ``i``: the rest of ``i``'s row reads some,
        the next row the others (the forward pass's window at tile ``i`` is the same set of
        stripes). Per node, a row ``k`` reads ``(own_k + other_k) * prod_a T_a
        - own_k * prod_a O_a`` pixels, where ``own``/``other`` are the lengths of its cell and
        of its stripes along the first axis and ``T_a``/``O_a`` the sums over all blocks of an
        other axis ``a`` of (cell + stripes) and of cells."""
        return int(max(self._row_bytes(input_size), default=0))

    def band_stripe_bytes(self, input_size: tuple[int, ...]) -> tuple[int, int]:
        """Banded carry: bytes of the stripes of the largest band and of the last band (the
        stripes read by a band's rows; no stripe crosses a band start)."""
        rows = self._row_bytes(input_size)
        if not rows:
            return 0, 0
        starts = list(self._shape_plan(input_size).schedule.band_starts(len(rows))) + [len(rows)]
        bands = [sum(rows[a:b]) for a, b in zip(starts, starts[1:])]
        return int(max(bands)), int(bands[-1])

    def tile_stripe_bytes(self, input_size: tuple[int, ...]) -> int:
        """Bytes of the stripes the tile that reads the most reads (0 under recompute)."""
        if not self.schedule.carries:
            return 0
        key = ("tile stripes", tuple(input_size))
        if key not in self._tile_shapes:
            self._tile_shapes[key] = _tile_stripe_bytes(self._shape_plan(input_size), self.batch, self._bpp)
        return self._tile_shapes[key]

    def _row_bytes(self, input_size: tuple[int, ...]) -> list:
        if not self.schedule.carries:
            return []
        key = ("row stripes", tuple(input_size))
        if key not in self._tile_shapes:
            self._tile_shapes[key] = _row_stripe_bytes(self._shape_plan(input_size), self.batch, self._bpp)
        return self._tile_shapes[key]

    def stripe_parts(self, input_size: tuple[int, ...]) -> dict:
        """The carry schedule's stripes in each phase of a training step, by placement
        (``{}`` under recompute): phase ('forward', 'head' for the head and rest phases,
        'backward') -> parts.

        * ``"device"``: the store (every stripe, from the forward pass until its last reader
          is back-propagated) in every phase, and the pending gradients in the backward pass;
        * ``"host"``: the store in host memory; on the device, the forward pass's rolling
          window and, in the backward pass, the stripes of two tiles (the one computing and
          the one prefetched) and the pending gradients;
        * ``"banded"``: the window and the last band's stripes in the forward pass; in the
          backward pass one band's stripes (rebuilt, or kept from the forward pass) and the
          pending gradients, which never cross a band.
        """
        if not self.schedule.carries:
            return {}
        pending = {"pending grads": self.row_stripe_bytes(input_size)}
        window = {"stripes (window)": self.row_stripe_bytes(input_size)}
        if self.placement == "host":
            store = {"stripe store (host)": self.stripe_bytes(input_size)}
            fetched = {"stripes (fetched)": 2 * self.tile_stripe_bytes(input_size)}
            return {"forward": {**window, **store}, "head": store, "backward": {**store, **fetched, **pending}}
        if self.placement == "banded":
            largest, last = self.band_stripe_bytes(input_size)
            kept = {"stripe store (last band)": last}
            return {
                "forward": {**window, **kept},
                "head": kept,
                "backward": {"stripe store (one band)": largest, **pending},
            }
        store = {"stripe store": self.stripe_bytes(input_size)}
        return {"forward": store, "head": store, "backward": {**store, **pending}}

    def where(self, part: str) -> str:
        """'device' or 'host': where a part of a prediction lives."""
        if not self.accelerator:
            return "device"
        if part in HOST_PARTS or (self.output_on_host and part in OUTPUT_PARTS):
            return "host"
        return "device"

    def budgeted(self, peak: Peak):
        """The bytes a memory budget bounds: the compute device's peak (on a CPU, the total)."""
        return peak.device.total if peak.device is not None else peak.total

    def full_size_terms(self, input_size: tuple[int, ...]) -> tuple[dict, dict]:
        """Node sizes of the image, and the trunk-output and plain-remainder parts."""
        sizes = node_sizes(self.trunk, input_size)
        # every trunk output is assembled whole, and so is its gradient (summed over the outputs)
        out = sum(self.batch * self._bpp[o] * math.prod(sizes[o]) for o in self.geo.outputs)
        parts = {"trunk output": out, "trunk output grad": out}
        if self.head is not None:
            saved, largest = self.head.bytes(math.prod(input_size))
            parts["head activations"] = self.batch * (saved + largest)
        if self.rest_stats:
            px = {name: math.prod(size) for name, size in sizes.items()}
            act = {s.name: self.batch * s.bytes_per_pixel * px[s.name] for s in self.stats + self.rest_stats}
            parts["rest backward"] = _backward_peak(self.rest_stats, act, px, self.batch, self.inputs, {})
        return sizes, parts

    def peak_expr(self, input_size: tuple[int, ...], symbols: tuple | None = None) -> sympy.Expr:
        """Peak bytes of a streamed training step that a memory budget bounds (see
        :meth:`budgeted`) as a sympy expression in the tile edge (one symbol per axis;
        default a single symbol ``t`` for square tiles). The stripes are those of the
        model's own plan."""
        t = symbols or (sympy.Symbol("t", positive=True, integer=True),) * self.geo.ndim
        sizes, full = self.full_size_terms(input_size)
        px = self.interior_pixels(t, sizes)
        tile = self.tile_terms(px, self.interior_copies(px), views=self.interior_views(px))
        return self.budgeted(self._training(self.resident(input_size), full, tile, self.stripe_parts(input_size)))

    def training_peak(self, input_size: tuple[int, ...], tile: int | tuple[int, ...]) -> int:
        """:meth:`peak_expr` evaluated at the tile edge ``tile`` (an int, or one per axis)."""
        tile = tile if isinstance(tile, tuple) else (tile,) * self.geo.ndim
        sizes, full = self.full_size_terms(input_size)
        px = {k: int(v) for k, v in self.interior_pixels(tile, sizes).items()}
        parts = self.tile_terms(px, self.interior_copies(px), views=self.interior_views(px))
        peak = self._training(self.resident(input_size), full, parts, self.stripe_parts(input_size))
        return int(self.budgeted(peak))

    def estimate(self, input_size: tuple[int, ...], exact: bool = True) -> Estimate:
        """Peaks for one input size: over the exact regions of every tile of the plan's
        tiling (``exact``), or from the interior-tile formula clipped to the image."""
        resident = self.resident(input_size)
        sizes, full = self.full_size_terms(input_size)
        if exact:
            shapes = self.tile_shapes(input_size)
            tile = _max_parts(self.tile_terms(t.px, t.copies, views=t.views) for t in shapes)
        else:
            px = {k: int(v) for k, v in self.interior_pixels(self.plan.tile_size, sizes).items()}
            tile = self.tile_terms(px, self.interior_copies(px), views=self.interior_views(px))
        whole = self.tile_terms({k: math.prod(v) for k, v in sizes.items()}, None, self.stats + self.rest_stats)
        grads = self.params.trunk + self.params.head
        # inference frees a stripe once its last reader has run: the rolling window
        window = {"stripes (window)": self.row_stripe_bytes(input_size)} if self.schedule.carries else {}
        inference = [
            _peak(
                "forward",
                resident,
                window,
                {"trunk output": full["trunk output"], "tile forward": tile["tile forward"]},
            )
        ]
        return Estimate(
            streamed_training=self._training(resident, full, tile, self.stripe_parts(input_size)),
            streamed_inference=self._located(inference),
            plain_training=_peak(
                "backward",
                resident,
                {"activations (backward)": whole["tile backward"], "head activations": full.get("head activations", 0)},
                {"parameter grads": grads},
            ),
            plain_inference=_peak("forward", resident, {"activations": whole["tile forward"]}),
        )

    def _training(self, resident: dict, full: dict, tile: dict, stripes: dict | None = None) -> Peak:
        """The phases of a training step. ``stripes``: :meth:`stripe_parts`. The executor keeps
        the last tile's graph from the forward pass to the backward pass ("kept tile": its
        saved tensors), so it is alive in the head and rest phases."""
        head_grads = self.params.head
        stripes = stripes or {}
        store = stripes.get("head", {})
        kept = {"kept tile": tile["tile saved"]}
        phases = [
            _peak(
                "forward",
                resident,
                stripes.get("forward", {}),
                {"trunk output": full["trunk output"], "tile forward": tile["tile forward"]},
            ),
            _peak(
                "backward",
                resident,
                stripes.get("backward", {}),
                {"trunk output grad": full["trunk output grad"], "trunk param grads (x2)": 2 * self.params.trunk},
                {"head param grads": head_grads, "tile backward": tile["tile backward"]},
            ),
        ]
        if "head activations" in full:  # the plain head: its saved tensors and its largest one, then its backward
            phases.append(
                _peak(
                    "head",
                    resident,
                    store,
                    kept,
                    {"trunk output": full["trunk output"], "head activations": full["head activations"]},
                    {"trunk output grad": full["trunk output grad"], "head param grads": head_grads},
                )
            )
        if "rest backward" in full:
            phases.append(
                _peak(
                    "rest",
                    resident,
                    store,
                    kept,
                    {"trunk output": full["trunk output"], "rest backward": full["rest backward"]},
                    {"head param grads": head_grads},
                )
            )
        return self._located(phases)

    def _located(self, phases: list) -> Peak:
        """The largest of ``phases`` (Peaks), with the peaks of its device and host parts."""

        def largest(peaks: list) -> Peak:
            if any(isinstance(p.total, sympy.Basic) for p in peaks):
                return Peak(sympy.Max(*(p.total for p in peaks), evaluate=False), "max", {})
            return max(peaks, key=lambda p: p.total)

        located = {}
        for where in ("device", "host"):
            located[where] = largest(
                [_peak(p.phase, {k: v for k, v in p.parts.items() if self.where(k) == where}) for p in phases]
            )
        total = largest(phases)
        return Peak(total.total, total.phase, total.parts, located["device"], located["host"])


def _row_stripe_bytes(shape: ShapePlan, batch: int, bpp: dict) -> list:
    """The bytes of stripes that each block row along the first axis reads (see
    :meth:`MemoryModel.row_stripe_bytes`)."""
    axes = [[dict(part.pieces) for part in axis] for axis in shape.axes]
    names = {name for part in axes[0] for name in part}
    rows = [0.0] * len(axes[0])
    for name in names:
        totals, owns = 1, 1
        for axis in axes[1:]:
            segments = [part.get(name, ()) for part in axis]
            totals *= sum(hi - lo for seg in segments for _, (lo, hi) in seg)
            owns *= sum(seg[-1][1][1] - seg[-1][1][0] for seg in segments if seg)
        for k, part in enumerate(axes[0]):
            seg = part.get(name, ())
            if not seg:
                continue
            own = seg[-1][1][1] - seg[-1][1][0]
            everything = sum(hi - lo for _, (lo, hi) in seg)
            rows[k] += batch * bpp[name] * (everything * totals - own * owns)
    return rows


def _tile_stripe_bytes(shape: ShapePlan, batch: int, bpp: dict) -> int:
    """The most bytes of stripes one tile reads: per node, its region minus its own cell,
    ``prod_a (own_a + other_a) - prod_a own_a`` pixels, over the distinct blocks of each axis."""
    per_axis = []
    for axis in shape.axes:
        kinds = set()
        for part in axis:
            lengths = []
            for name, segments in part.pieces:
                own = segments[-1][1][1] - segments[-1][1][0]
                lengths.append((name, own, sum(hi - lo for _, (lo, hi) in segments)))
            kinds.add(tuple(lengths))
        per_axis.append(kinds)
    best = 0
    for combo in itertools.product(*per_axis):
        total = 0
        for nodes in zip(*combo):  # the same node along every axis
            name = nodes[0][0]
            total += batch * bpp[name] * (math.prod(t for _, _, t in nodes) - math.prod(o for _, o, _ in nodes))
        best = max(best, total)
    return int(best)


def block_for(plan: Plan, axis: int, tile):
    """Output block per tile along ``axis`` for a tile edge ``tile`` (int or sympy): the
    largest ``n`` with ``S*n + L + R <= tile`` (the plan's rule, see ``geometry.block_for_tile``)."""
    (left, right), stride = plan.halo[axis], sympy.nsimplify(plan.stride[axis])
    return sympy.floor((tile - left - right) / stride)


class TileShape(NamedTuple):
    """Tiles that compute the same regions: ``px`` node -> pixels, ``copies`` window op
    -> pixels of the padded copy of its input (at the image border), ``views`` conv ->
    pixels of the contiguous copy it makes of a cropped (non-contiguous) input window,
    ``count`` tiles."""

    px: dict
    copies: dict
    views: dict
    count: int


def tile_pixels(
    geo: TrunkGeometry, plan: Plan, input_size: tuple[int, ...], schedule: Schedule, shape: ShapePlan | None = None
) -> list[TileShape]:
    """The distinct tiles of the schedule's tiling of ``input_size``.

    Regions are products of per-axis intervals and each axis's interval depends on the
    block along that axis only, so the walk runs once per block position per axis. Under
    the carry schedule a node computes its cell, and a consumer of a node whose region
    holds stripes of earlier cells reads an assembled copy of that region. ``shape``: that
    tiling (``tiling.plan_shape``), when the caller has it already."""
    shape = plan_shape(geo, plan, input_size, schedule) if shape is None else shape
    sizes = node_sizes(geo, input_size)
    image = geo.image
    windows = {s.name for s in geo.steps if s.kind in COPIES_WINDOW}
    contiguous = {s.name for s in geo.steps if s.kind in CONTIGUOUS_INPUT}
    per_axis = []
    for axis, parts in enumerate(shape.axes):
        counts: dict = {}
        for part in parts:
            computed, region = dict(part.computed), dict(part.region)
            lengths = tuple(sorted((k or image, hi - lo) for k, (lo, hi) in computed.items()))
            assembled = tuple(sorted((k, hi - lo) for k, (lo, hi) in region.items() if k and region[k] != computed[k]))
            edges = tuple(
                sorted(
                    (c, *_edge(r, region[p if p != image else ""], sizes[p][axis]))
                    for (c, p), r in part.reads
                    if c in windows
                )
            )
            key = (lengths, edges, assembled)
            counts[key] = counts.get(key, 0) + 1
        per_axis.append([(dict(k[0]), k[1], dict(k[2]), count) for k, count in counts.items()])
    result = []
    for combo in itertools.product(*per_axis):
        px = {name: math.prod(lengths[name] for lengths, _, _, _ in combo) for name in combo[0][0]}
        copies, views = {}, {}
        for edge in zip(*(edges for _, edges, _, _ in combo)):  # the same edge along every axis
            consumer, pixels = edge[0][0], math.prod(length for _, length, _, _ in edge)
            if any(padded for _, _, padded, _ in edge):
                copies[consumer] = pixels
            elif any(cropped for _, _, _, cropped in edge) and consumer in contiguous:
                views[consumer] = pixels
        for name in set().union(*(assembled for _, _, assembled, _ in combo)):
            pixels = math.prod(assembled.get(name, lengths[name]) for lengths, _, assembled, _ in combo)
            for step in geo.steps:
                if name in step.inputs and step.name not in copies:
                    copies[step.name] = pixels
        result.append(TileShape(px, copies, views, math.prod(count for _, _, _, count in combo)))
    return result


def _edge(raw: tuple, region: tuple, size: int) -> tuple:
    """``(length, padded, cropped)`` of a consumer's raw window on one axis: padded where
    it leaves the image, cropped where it is a strict part of the producer's region."""
    lo, hi = raw
    padded = lo < 0 or hi > size
    cropped = max(lo, 0) > region[0] or min(hi, size) < region[1]
    return hi - lo, padded, cropped


def _peak(phase: str, *groups: dict) -> Peak:
    parts = {k: v for group in groups for k, v in group.items()}
    total = sum(parts.values())
    if not isinstance(total, sympy.Basic):
        parts = {k: int(round(v)) for k, v in parts.items()}
        total = sum(parts.values())
    return Peak(total, phase, parts)


def _max_parts(terms) -> dict:
    """Each tile part at its largest over the tiles (each phase of a step uses one part)."""
    result: dict = {}
    for parts in terms:
        for key, value in parts.items():
            result[key] = max(result.get(key, value), value)
    return result


def _forward_peak(stats: list, act: dict, copies: dict) -> sympy.Expr | float:
    """Largest sum of live storages over the execution order of a no_grad pass: a
    storage lives from its first node to the last reader of any view of it; a padded
    input copy lives while its node runs."""
    first: dict = {}
    last: dict = {}
    for i, s in enumerate(stats):
        first.setdefault(s.owner, i)
        last[s.owner] = max(last.get(s.owner, i), s.last_use)
    live, totals = 0, []
    ends: dict = {}
    for owner, end in last.items():
        ends.setdefault(end, []).append(owner)
    for i, s in enumerate(stats):
        if first[s.owner] == i:
            live = live + act[s.owner]
        totals.append(live + copies.get(s.name, 0))
        for owner in ends.get(i, []):
            live = live - act[owner]
    return _max(totals)


def _saved(stats: list, act: dict, px: dict, batch: int, copies: dict | None = None):
    owners = {s.owner for s in stats if _kept(s, copies)}
    extra = sum(batch * s.extra_saved_per_pixel * px[s.name] for s in stats if s.extra_saved_per_pixel)
    return sum(act[o] for o in owners) + extra + sum((copies or {}).values())


def _kept(s, copies: dict | None) -> bool:
    """Whether a node's storage is kept for the backward pass: some node saves it
    directly, not a padded copy of it (a consumer that gets a copy saves the copy)."""
    if not s.saved:
        return False
    return not copies or not s.savers or any(saver not in copies for saver in s.savers)


def _backward_peak(stats: list, act: dict, px: dict, batch: int, inputs: dict, copies: dict | None = None):
    """Largest memory while back-propagating in reverse order: at node m, the saved
    storages (extras and saved input copies included) of the nodes up to m, plus the
    gradient of m's output and of its inputs."""
    seen: set = set()
    saved, terms = 0, []
    copies = copies or {}
    for s in stats:
        if _kept(s, copies) and s.owner not in seen:
            seen.add(s.owner)
            saved = saved + act[s.owner]
        if s.extra_saved_per_pixel:
            saved = saved + batch * s.extra_saved_per_pixel * px[s.name]
        saved = saved + copies.get(s.name, 0)
        grads = act[s.name] + sum(act.get(p, 0) for p in inputs.get(s.name, ()))
        terms.append(saved + grads)
    return _max(terms)


def _has_padding(step) -> bool:
    return any(getattr(st, "pad_lo", 0) > 0 or getattr(st, "pad_hi", 0) > 0 for st in step.stencils or ())


def _max(values: list):
    if any(isinstance(v, sympy.Basic) for v in values):
        return sympy.Max(*values, evaluate=False)
    return max(values, default=0)


def _interior_affine(geo: TrunkGeometry, plan: Plan) -> dict:
    """node -> per axis ``(a, b)``: the node computes ``a*n + b`` pixels along that axis
    for an interior output block of ``n`` pixels (fitted on two blocks, exact)."""
    base = tuple(max(b, 1) for b in plan.block)
    lengths = [_interior_lengths(geo, plan, tuple(k * n for n in base)) for k in (1, 2)]
    affine = {}
    for name in lengths[0]:
        per_axis = []
        for axis, n in enumerate(base):
            one, two = lengths[0][name][axis], lengths[1][name][axis]
            a = Fraction(two - one, n)
            per_axis.append((sympy.Rational(a.numerator, a.denominator), one - a * n))
        affine[name] = per_axis
    return affine


def _interior_lengths(geo: TrunkGeometry, plan: Plan, block: tuple) -> dict:
    """Region lengths of the output block ``block`` placed well inside a large image."""
    lo = tuple(math.ceil(left / s) + 2 for (left, _), s in zip(plan.halo, plan.stride))
    size = tuple(
        math.ceil(s * (2 * start + n + 2)) + 2 * r
        for s, start, n, r in zip(plan.stride, lo, block, plan.receptive_field)
    )
    regions = node_regions(geo, _valid_size(geo, size), tuple((a, a + n) for a, n in zip(lo, block)))
    return {name: tuple(hi - l0 for l0, hi in region) for name, region in regions.items()}


def _valid_size(geo: TrunkGeometry, size: tuple[int, ...]) -> tuple[int, ...]:
    """``size`` rounded up to a multiple of a power of two that the network accepts (a
    U-Net's skip connections only line up at sizes divisible by its total downsampling)."""
    multiple = 1
    while True:
        candidate = tuple(-(-n // multiple) * multiple for n in size)
        try:
            node_sizes(geo, candidate)
            return candidate
        except InputShapeError:
            if multiple >= 1 << 16:
                raise
            multiple *= 2
