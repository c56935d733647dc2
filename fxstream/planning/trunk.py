"""The trunk as plain data: :class:`Analysis` -> :class:`TrunkGeometry`.

:class:`TrunkGeometry` holds, per trunk node, its kind, its inputs and its stencils (one
axis op per spatial axis), and the tile ABI's geometry slots: ints, tuples and strings,
no fx.Node and no sympy. :mod:`fxstream.planning.plan` derives the :class:`Plan` from it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from ..analysis import levels
from ..analysis.analyze import Analysis, to_networkx
from ..errors import module_path, source_line
from ..ops import shapes
from ..ops import table as ops
from ..ops.statistics import ReductionSpec
from ..ops.windows import WINDOWS

Pair = tuple[int, int]


@dataclass(frozen=True)
class Step:
    """One trunk node. ``kind`` is 'local' or a window kind ('conv', 'max_pool', 'avg_pool', 'pad',
    'conv_transpose', 'shuffle', 'unshuffle', 'resample', 'broadcast'); ``stencils`` holds one axis
    op per spatial axis (``geometry.Stencil``, ``Transposed``, ``Shuffle`` or ``Resample``). A
    'broadcast' step (a statistic grid resampled to its input's size) reads its input through
    identity stencils: the input gives it its size and is never read in the tile code."""

    name: str
    kind: str
    op: str
    module_path: str
    inputs: tuple[str, ...]
    stencils: tuple | None = None
    fill: str = "constant"
    include_pad: bool = True
    divisor: int | None = None
    source: str = ""  # the user's source line, for error messages
    depth: int = 0  # the highest level of global statistics it depends on (its passes: levels above it)
    # dynamic steps (window set by sizes, e.g. F.pad(x, [dx // 2, ...])): stencils per input size
    resolve: Callable | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def extra_slots(self) -> tuple[str, ...]:
        """The geometry slots this step needs besides its input windows (``windows.WindowKind.slots``)."""
        return WINDOWS[self.kind].slots(self.divisor) if self.kind in WINDOWS else ()


@dataclass(frozen=True)
class Slot:
    """One entry of a tile's geometry tuple: the crop/pad of an edge ('window'), the
    divisors of an average pooling ('counts'), the crop of an op's result to the node's
    region ('trim'), the taps of a resampling ('resample'), or where the tile's block lies in
    the whole map ('position': ``ops.statistics.Position`` per axis, for adaptive pooling bins
    and broadcast-back taps). ``consumer`` is '' for the final crop of a trunk output, and a
    statistic's name for the crop of its owned block of the statistic's input."""

    kind: str
    consumer: str
    producer: str


@dataclass(frozen=True)
class SizeNode:
    """A shape/size value that dynamic steps need: evaluated before step ``before``."""

    name: str
    before: int
    evaluate: Callable = dataclasses.field(compare=False, repr=False)


@dataclass(frozen=True)
class StatisticStep:
    """One global statistic (issue 20): the reducer ``name``, its ``spec``, its spatial
    ``input`` (a trunk node or the image), its ``level``, and for messages its category, op
    and module path. Pass ``level`` sums the tiles' partials over their owned blocks of ``input``."""

    name: str
    spec: ReductionSpec
    input: str
    level: int
    category: str = ""
    op: str = ""
    module_path: str = ""


@dataclass(frozen=True)
class TrunkGeometry:
    """``outputs``: the trunk outputs in topological order; ``output``, the last, is the
    *primary* output, whose blocks define the tiles. Tile ``k`` computes the block of every
    other output aligned with the primary's (:func:`aligned`).

    Global statistics: ``statistics`` (one :class:`StatisticStep` each), ``values`` (the
    statistic values the trunk reads, with their levels) and ``passes`` (per level ``j``, the
    nodes of ``A_j``, in step order). :attr:`blocked` are the nodes each tile owns a block of:
    the outputs, then the statistics' inputs."""

    ndim: int
    image: str
    output: str
    steps: tuple[Step, ...]
    dims: tuple[tuple[str, tuple[int, ...]], ...]  # node -> tensor dim of each spatial axis
    slots: tuple[Slot, ...]
    size_nodes: tuple[SizeNode, ...] = ()
    outputs: tuple[str, ...] = ()
    statistics: tuple[StatisticStep, ...] = ()
    values: tuple[tuple[str, int], ...] = ()
    passes: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if not self.outputs:
            object.__setattr__(self, "outputs", (self.output,))

    @functools.cached_property
    def blocked(self) -> tuple[str, ...]:
        """The trunk outputs, then the statistics' inputs: their blocks partition each of them."""
        return tuple(dict.fromkeys(self.outputs + tuple(s.input for s in self.statistics)))

    @property
    def levels(self) -> int:
        return max((s.level for s in self.statistics), default=0)

    @functools.cached_property
    def steps_by_name(self) -> dict:
        return {step.name: step for step in self.steps}

    @functools.cached_property
    def _dims(self) -> dict:
        return dict(self.dims)

    def slot(self, kind: str, consumer: str, producer: str) -> int:
        return self.slots.index(Slot(kind, consumer, producer))

    def axis_dims(self, name: str) -> tuple[int, ...]:
        return self._dims[name]


def build_geometry(analysis: Analysis) -> TrunkGeometry:
    steps, slots = [], []
    order = {n: i for i, n in enumerate(analysis.gm.graph.nodes)}
    size_nodes = tuple(
        SizeNode(n.name, sum(order[t] < order[n] for t in analysis.trunk), shapes.size_evaluator(n, analysis.layouts))
        for n in analysis.size_nodes or ()
    )
    for node in analysis.trunk:
        verdict = analysis.verdicts[node]
        inputs = tuple(dict.fromkeys(n.name for n in node.all_input_nodes if n in analysis.layouts))
        depth = analysis.depth.get(node, 0)
        step = Step(
            node.name,
            "local",
            _op_name(analysis, node),
            module_path(node),
            inputs,
            source=source_line(node),
            depth=depth,
        )
        if isinstance(verdict, ops.Window):
            step = Step(
                node.name,
                verdict.kind,
                step.op,
                step.module_path,
                (verdict.input.name,),
                verdict.stencils,
                verdict.fill,
                verdict.params.get("include_pad", True),
                verdict.params.get("divisor"),
                step.source,
                depth,
            )
        if node in analysis.dynamic:
            module = analysis.gm.get_submodule(node.target) if node.op == "call_module" else None
            resolve = shapes.window_resolver(node, module, analysis.layouts, analysis.ndim)
            step = dataclasses.replace(step, resolve=resolve)
        steps.append(step)
        slots += [Slot("window", node.name, producer) for producer in step.inputs]
        slots += [Slot(kind, node.name, step.inputs[0]) for kind in step.extra_slots]
    slots += [Slot("window", "", output.name) for output in analysis.outputs]
    statistics = tuple(
        StatisticStep(s.node.name, s.spec, s.input.name, s.level, s.category, s.op, module_path(s.node))
        for s in analysis.statistics
    )
    for stat in statistics:  # the crop of its owned block, and where the block lies (adaptive pooling's bins)
        slots.append(Slot("window", stat.name, stat.input))
        if stat.spec.kind == "adaptive_avg_pool":
            slots.append(Slot("position", stat.name, stat.input))
    nodes = [analysis.image] + analysis.trunk
    dims = tuple((n.name, tuple(analysis.layouts[n].index(a) for a in range(analysis.ndim))) for n in nodes)
    outputs = tuple(n.name for n in analysis.outputs)
    passes = ()
    if statistics:
        found = levels.pass_nodes(analysis.trunk, analysis.statistics, to_networkx(analysis.gm.graph))
        passes = tuple(tuple(n.name for n in analysis.trunk if n in found[j]) for j in range(1, analysis.levels + 1))
    return TrunkGeometry(
        analysis.ndim,
        analysis.image.name,
        outputs[-1],
        tuple(steps),
        dims,
        tuple(slots),
        size_nodes,
        outputs,
        statistics,
        tuple((v.name, level) for v, level in analysis.values),
        passes,
    )


def _op_name(analysis: Analysis, node) -> str:
    if node.op == "call_module":
        return type(analysis.gm.get_submodule(node.target)).__name__
    if node.op == "call_method":
        return f".{node.target}"
    return getattr(node.target, "__name__", str(node.target))
