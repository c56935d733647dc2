"""Per-node tensor statistics of a trunk, from one run on a tiny input.

The plan knows every node's *spatial* extent; the memory and cost models also need
what it does not: how many bytes one output pixel of a node takes (channels, batch,
dtype), which outputs autograd saves for the backward pass, what else it saves
(max-pooling indices...), and the FLOPs per output pixel. These do not depend on the
spatial size, so one run of the trunk on the smallest input the network accepts
(a few dozen pixels, batch 1) measures them, and the planned regions scale them:

    bytes of node m for a region R = bytes_per_pixel[m] * prod(R)

The run uses ``torch.autograd.graph.saved_tensors_hooks`` to see the saved tensors
and ``torch.utils.flop_counter.FlopCounterMode`` for FLOPs. The full-size image is
never allocated.

The head (what runs plain on the trunk outputs) is measured too: the bytes it saves for
its backward pass and its largest tensor, at two probe sizes, fitted as ``a + b * pixels``
of the input (:class:`HeadFit`; a pooled classifier head is about constant, a dense decoder
grows with the image). A head that does not run at the probe sizes is not counted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from ..analysis.analyze import Analysis, head_nodes
from ..errors import FxStreamError, InputShapeError
from ..frontend.tracecheck import side_effects_undone
from ..planning.plan import node_sizes
from ..planning.trunk import TrunkGeometry


@dataclass(frozen=True)
class NodeStats:
    """One node (the image or a trunk node). Byte counts are per output pixel, batch 1."""

    name: str
    bytes_per_pixel: float  # its output tensor, at the target dtype
    owner: str  # node whose storage the output lives in (itself, or the base of a view)
    saved: bool  # autograd keeps this storage for the backward pass
    savers: tuple[str, ...]  # the nodes whose backward keeps it (itself, or its consumers)
    extra_saved_per_pixel: float  # other saved tensors made by this node (e.g. pooling indices)
    flops_per_pixel: float  # forward FLOPs per output pixel (at least one per element)
    last_use: int  # index (in ``TrunkStats.nodes``) of the last node that reads it
    shape: tuple[int, ...] = ()  # its shape in the probe run (batch 1, ``TrunkStats.probe_size``)


@dataclass(frozen=True)
class HeadFit:
    """The head's activations for an input of ``p`` pixels (batch 1): ``saved`` bytes kept
    for its backward pass, and its ``largest`` tensor, each ``(a, b)`` for ``a + b * p``."""

    saved: tuple[float, float]
    largest: tuple[float, float]

    def bytes(self, pixels: int) -> tuple[int, int]:
        """(saved, largest) bytes for an input of ``pixels`` pixels (never below zero)."""
        return tuple(max(0, int(math.ceil(a + b * pixels))) for a, b in (self.saved, self.largest))


@dataclass(frozen=True)
class TrunkStats:
    """Statistics of every trunk node, in execution order (the image first)."""

    nodes: tuple[NodeStats, ...]
    itemsize: int  # bytes per element of the target dtype
    const_saved_bytes: int  # saved tensors computed from parameters alone (per tile)
    probe_size: tuple[int, ...]  # the spatial size of the tiny run
    head: HeadFit | None = None  # None: the head did not run at the probe sizes (not counted)
    statistic_shapes: dict = dataclasses.field(default_factory=dict)  # statistic -> its value's shape (batch 1)

    def by_name(self) -> dict:
        return {n.name: n for n in self.nodes}


def smallest_input(geo: TrunkGeometry, limit: int = 1 << 16) -> tuple[int, ...]:
    """A small spatial size that every trunk node accepts: 8 pixels per axis, doubled
    until the network runs (not a degenerate 1-pixel probe)."""
    size = 8
    while size <= limit:
        try:
            node_sizes(geo, (size,) * geo.ndim)
            return (size,) * geo.ndim
        except InputShapeError:
            size *= 2
    raise InputShapeError(f"found no input size up to {limit} pixels that the trunk accepts")


def measure(analysis: Analysis, geo: TrunkGeometry, channels: int, dtype: torch.dtype) -> TrunkStats:
    """Run the trunk once on a ``(1, channels, *small)`` input and collect :class:`NodeStats`."""
    size = smallest_input(geo)
    gm = analysis.gm
    param = next(iter(gm.parameters()), None)
    run_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    image = torch.zeros(1, channels, *size, dtype=run_dtype, device=device)
    itemsize = torch.empty((), dtype=dtype).element_size()
    run = _Run(gm, analysis, itemsize)
    try:
        with side_effects_undone(gm, device):
            run.execute(image)
    except FxStreamError:
        raise
    except Exception as exc:  # the user's model failed on the probe: most likely a wrong channel count
        raise InputShapeError(
            f"the trunk failed on a probe input of shape {tuple(image.shape)}: {exc}. "
            "Check the channel count of the input shape."
        ) from exc
    stats = run.stats(geo, size)
    return dataclasses.replace(stats, head=_head_fit(analysis, geo, image, itemsize, (run.head_bytes(), size)))


HEAD_PROBE_PIXELS = 4096  # at least this many input pixels in the head's smaller probe


def head_probe_size(size: tuple[int, ...]) -> tuple[int, ...]:
    """The head's smaller probe size: ``size`` (the trunk's probe) doubled per axis until it
    has ``HEAD_PROBE_PIXELS`` pixels. A head that downsamples further (the layers after a
    streamed prefix) has one-pixel maps at the trunk's tiny probe, where its activations do
    not grow with the image yet."""
    while math.prod(size) < HEAD_PROBE_PIXELS:
        size = tuple(2 * s for s in size)
    return size


def _head_fit(analysis: Analysis, geo: TrunkGeometry, image, itemsize: int, first) -> HeadFit | None:
    """The head's activations at a probe size (:func:`head_probe_size`) and at twice it,
    fitted linearly in pixels. ``first``: the head bytes and size of the trunk's probe run."""
    (saved1, largest1), size1 = first
    if saved1 is None:
        return None
    try:
        if head_probe_size(size1) != size1:
            size1 = head_probe_size(size1)
            saved1, largest1 = _head_bytes(analysis, geo, image, itemsize, size1)
        saved2, largest2 = _head_bytes(analysis, geo, image, itemsize, tuple(2 * s for s in size1))
    except Exception:  # the trunk or the head does not run there: do not count the head
        return None
    if saved1 is None or saved2 is None:
        return None
    p1, p2 = math.prod(size1), math.prod(tuple(2 * s for s in size1))

    def fit(v1: int, v2: int) -> tuple[float, float]:
        """Through both points; a constant (the larger) if the head shrinks with the image."""
        if v2 < v1:
            return float(v1), 0.0
        slope = (v2 - v1) / (p2 - p1)
        return v2 - slope * p2, slope

    return HeadFit(fit(saved1, saved2), fit(largest1, largest2))


def _head_bytes(analysis: Analysis, geo: TrunkGeometry, image, itemsize: int, size: tuple[int, ...]) -> tuple:
    """(saved, largest) head bytes of one probe run of the model at ``size`` (saved None: the
    head failed there)."""
    node_sizes(geo, size)
    run = _Run(analysis.gm, analysis, itemsize)
    with side_effects_undone(analysis.gm, image.device):
        run.execute(image.new_zeros(*image.shape[:2], *size))
    return run.head_bytes()


class _Run:
    """Executes the image, the trunk's constants and the trunk nodes of ``gm`` in order."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, itemsize: int):
        self.interp = fx.Interpreter(gm)
        self.analysis = analysis
        self.itemsize = itemsize
        self.saved: dict = {}  # storage pointer -> (bytes, node being run)
        self.savers: dict = {}  # storage pointer -> names of the nodes that saved it
        self.flops: dict = {}
        self.current = None
        self.param_ptrs = {_ptr(t) for t in list(gm.parameters()) + list(gm.buffers())}
        self.head_saved: dict | None = {}  # storage pointer -> bytes saved by head nodes (None: the head failed)
        self.head_largest = 0

    def execute(self, image: torch.Tensor) -> None:
        analysis = self.analysis
        wanted = set(analysis.trunk) | set(analysis.constants) | _statistic_nodes(analysis)
        sizes = set(analysis.size_nodes or ())  # pad amounts etc. of size-dependent windows (x.size(2) // 2)
        env = self.interp.env
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            for node in analysis.gm.graph.nodes:
                if node is analysis.image:
                    env[node] = image
                elif node in sizes and all(n in env for n in node.all_input_nodes):
                    env[node] = self.interp.run_node(node)
                elif node in wanted:
                    self.current = node
                    with FlopCounterMode(display=False) as counter:
                        env[node] = self.interp.run_node(node)
                    self.flops[node] = counter.get_total_flops()
            self._run_head()

    def _run_head(self) -> None:
        """The head nodes, after the trunk: the bytes they save (not the trunk's), and their
        largest tensor. Any failure (a head that needs another input size) leaves ``head_saved``
        None."""
        analysis, env = self.analysis, self.interp.env
        head = head_nodes(analysis)  # the nodes the compiled outer graph runs
        trunk_ptrs = set(self.saved)
        self.current = None
        try:
            for node in analysis.gm.graph.nodes:
                if node in head and node not in env and node.op not in ("placeholder", "output"):
                    env[node] = self.interp.run_node(node)
                    if isinstance(env[node], torch.Tensor):
                        self.head_largest = max(self.head_largest, env[node].numel() * self._itemsize_of(env[node]))
        except Exception:
            self.head_saved = None
            return
        self.head_saved = {p: b for p, (b, _) in self.saved.items() if p not in trunk_ptrs}

    def head_bytes(self) -> tuple[int | None, int]:
        """(bytes the head saves for backward, its largest tensor); None when it did not run."""
        if self.head_saved is None:
            return None, 0
        outputs = {_ptr(self.interp.env[o]) for o in self.analysis.outputs}
        return sum(b for p, b in self.head_saved.items() if p not in outputs), self.head_largest

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        ptr = _ptr(tensor)
        if self.current is not None:
            self.savers.setdefault(ptr, set()).add(self.current.name)
        if ptr not in self.param_ptrs and ptr not in self.saved:
            elements = tensor.untyped_storage().nbytes() // tensor.element_size()
            self.saved[ptr] = (elements * self._itemsize_of(tensor), self.current)
        return tensor

    def stats(self, geo: TrunkGeometry, size: tuple[int, ...]) -> TrunkStats:
        analysis, env = self.analysis, self.interp.env
        nodes = [analysis.image] + analysis.trunk
        index = {n: i for i, n in enumerate(nodes)}
        owners: dict = {}
        for node in nodes:
            owners.setdefault(_ptr(env[node]), node)
        extra: dict = {}
        const_saved = 0
        inputs = {s.node: s.input for s in analysis.statistics}  # a reducer's float64 copy: its input's
        for ptr, (nbytes, node) in self.saved.items():
            if ptr in owners:
                continue
            node = inputs.get(node, node)
            if node in index:
                extra[node] = extra.get(node, 0) + nbytes
            else:
                const_saved += nbytes
        saved_owners = {owners[p] for p in self.saved if p in owners}
        sizes = node_sizes(geo, size)
        result = []
        for node in nodes:
            value = env[node]
            pixels = math.prod(sizes[node.name])
            elem = self._itemsize_of(value)
            owner = owners[_ptr(value)]
            users = [index[u] for u in node.users if u in index]
            last = len(nodes) - 1 if node in analysis.outputs else max(users, default=index[node])
            result.append(
                NodeStats(
                    name=node.name,
                    bytes_per_pixel=value.numel() * elem / pixels,
                    owner=owner.name,
                    saved=owner in saved_owners,
                    savers=tuple(sorted(self.savers.get(_ptr(value), ()))),
                    extra_saved_per_pixel=extra.get(node, 0) / pixels,
                    flops_per_pixel=max(self.flops.get(node, 0), value.numel()) / pixels,
                    last_use=last,
                    shape=tuple(value.shape),
                )
            )
        shapes = {}
        for stat in analysis.statistics:
            value = env.get(stat.node)
            value = value[0] if isinstance(value, tuple) else value
            if isinstance(value, torch.Tensor):
                shapes[stat.node.name] = tuple(value.shape)
        return TrunkStats(tuple(result), self.itemsize, const_saved, size, statistic_shapes=shapes)

    def _itemsize_of(self, tensor: torch.Tensor) -> int:
        """Floating tensors take the target dtype; others (indices, masks) keep theirs."""
        return self.itemsize if tensor.is_floating_point() else tensor.element_size()


def _statistic_nodes(analysis: Analysis) -> set:
    """The statistics' reducers, their heads, and the parameters and literals those read: the
    trunk's nodes read them (issue 20), so the probe run computes them (on the whole probe)."""
    trunk = set(analysis.trunk) | {analysis.image}
    found: set = set()
    stack = [s.node for s in analysis.statistics] + list(analysis.heads)
    for node in analysis.trunk:  # the size arguments of broadcast-backs (interpolate(grid, size=x.shape[2:]))
        if getattr(analysis.verdicts[node], "kind", None) == "broadcast":
            stack += [n for n in node.all_input_nodes if n not in trunk]
    while stack:
        node = stack.pop()
        if node in found or node in trunk or node.op == "placeholder":
            continue
        found.add(node)
        stack.extend(node.all_input_nodes)
    return found


def _ptr(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()
