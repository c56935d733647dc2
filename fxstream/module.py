"""The drop-in module returned by :func:`fxstream.compile`, and the pipeline that builds it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch
import torch.fx as fx
import torch.nn as nn

from .analyze import Analysis, analyze
from .codegen import StreamedTrunk, graph_module, outer_graph, tile_graph
from .errors import TileSizeError
from .plan import Plan, TrunkGeometry, build_geometry, build_plan
from .progress import StreamStats
from .runtime import StreamSettings
from .schedule import Schedule, as_schedule
from .trace import trace

TileSize = Union[int, tuple[int, ...]]  # noqa: UP007 (runtime alias, Python 3.10)


@dataclass
class Program:
    """Everything compiled for one setting of the modules' train/eval flags."""

    analysis: Analysis
    geometry: TrunkGeometry
    plan: Plan
    schedule: Schedule
    tile_graph: fx.Graph
    outer_graph: fx.Graph
    module: fx.GraphModule | None = None  # built on demand, dropped by .to()/.cuda()


def build_program(model: nn.Module, tile_size: TileSize, boundary: str | None, schedule=None) -> Program:
    gm = trace(model)  # nn.Module -> fx.GraphModule
    ndim = len(tile_size) if isinstance(tile_size, tuple) else None
    analysis = analyze(gm, boundary, ndim)  # -> Analysis: trunk, boundary, layouts
    geometry = build_geometry(analysis)  # -> TrunkGeometry: plain data
    schedule = as_schedule(schedule)  # -> Schedule: how the tiles run
    plan = build_plan(geometry, _tile_tuple(tile_size, analysis.ndim), schedule.carries)  # -> Plan (sympy)
    return Program(analysis, geometry, plan, schedule, tile_graph(analysis, geometry), outer_graph(analysis))


def _tile_tuple(tile_size: TileSize, ndim: int) -> tuple[int, ...]:
    sizes = (tile_size,) * ndim if isinstance(tile_size, int) else tuple(tile_size)
    if len(sizes) != ndim:
        raise TileSizeError(f"tile_size={tile_size} has {len(sizes)} entries, the trunk has {ndim} spatial dims")
    return sizes


def validate_tile_size(tile_size: TileSize) -> None:
    values = tile_size if isinstance(tile_size, tuple) else (tile_size,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise TileSizeError(
            f"tile_size must be a positive int or a tuple of positive ints (one per spatial dim), got {tile_size!r}"
        )


class StreamedModule(nn.Module):
    """A model whose trunk runs tile by tile, with the outputs and gradients of the original.

    It shares the original model's submodules, parameters and buffers under the same
    names, so ``state_dict()`` keys match and optimizers built on ``model.parameters()``
    keep working. ``.train()``/``.eval()`` recompile for the new mode on the next call
    (and raise :class:`UnsupportedOpError` there if the new mode is not streamable).
    """

    def __init__(
        self, model: nn.Module, tile_size: TileSize, boundary: str | None = None, settings=None, schedule=None
    ):
        super().__init__()
        for name, child in model.named_children():
            self.add_module(name, child)
        for name, param in model._parameters.items():
            self.register_parameter(name, param)
        for name, buf in model._buffers.items():
            self.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
        self.training = model.training
        # Plain attributes (not registered): the compiled programs are derived state.
        self.__dict__["_source"] = model
        self.__dict__["_config"] = (tile_size, boundary, as_schedule(schedule))
        self.__dict__["_programs"] = {}
        self.__dict__["settings"] = settings if settings is not None else StreamSettings()
        self.program()  # compile now, so errors surface at compile time

    def _mode_key(self) -> tuple:
        return tuple(m.training for m in self.modules())

    def program(self) -> Program:
        """The compiled program for the current train/eval flags."""
        key = self._mode_key()
        if key not in self._programs:
            self._programs[key] = build_program(self._source, *self._config)
        return self._programs[key]

    @property
    def plan(self) -> Plan:
        """The streaming plan (receptive field, halos, block per tile) for the current mode."""
        return self.program().plan

    @property
    def schedule(self) -> Schedule:
        """How the tiles run: ``Schedule('carry')`` or ``Schedule('recompute')``."""
        return self.program().schedule

    @property
    def streamed_trunk(self) -> StreamedTrunk:
        """The streamed trunk; ``streamed_trunk.tile.code`` is the generated per-tile code."""
        return self._graph_module().fxstream_trunk

    @property
    def code(self) -> str:
        """The generated code: the outer module, then the per-tile module."""
        gm = self._graph_module()
        return f"# outer module\n{gm.code}\n# per-tile module\n{gm.fxstream_trunk.tile.code}"

    def shape_plan(self, *spatial_size: int):
        """The tiles that an input of this spatial size is cut into."""
        return self.streamed_trunk.shape_plan(tuple(spatial_size))

    def _graph_module(self) -> fx.GraphModule:
        program = self.program()
        if program.module is None:
            tile = graph_module(self, program.tile_graph, "StreamedTile")
            trunk = StreamedTrunk(tile, program.geometry, program.plan, self.settings, program.schedule)
            program.module = graph_module(self, program.outer_graph, "StreamedModel", {"fxstream_trunk": trunk})
        return program.module

    def forward(self, *args, **kwargs):
        return self._graph_module()(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        for program in self._programs.values():
            program.module = None  # rebuilt against the moved tensors
        return result

    @property
    def progress(self) -> bool:
        """Whether a tqdm bar shows the tiles of every pass (settable)."""
        return self.settings.progress

    @progress.setter
    def progress(self, value: bool) -> None:
        self.settings.progress = bool(value)

    @property
    def last_stats(self) -> StreamStats:
        """Tiles, time and peak memory of the streaming work since the last reset
        (``serial_backward`` resets it at the start of each step)."""
        return self.settings.stats

    def extra_repr(self) -> str:
        tile_size, boundary, schedule = self._config
        return f"tile_size={tile_size}, boundary={boundary!r}, schedule={schedule.kind!r}"


def compile(
    model: nn.Module,
    tile_size: TileSize,
    *,
    boundary: str | None = None,
    input_transform: Callable | None = None,
    output_device: str | torch.device | None = None,
    progress: bool = False,
    memory_budget: int | str | None = None,
    input_shape: tuple[int, ...] | None = None,
    verbose: bool = False,
    schedule: str | Schedule | None = None,
) -> StreamedModule:
    """Compile ``model`` so its local trunk runs tile by tile with exact gradients.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace. Its trunk (everything up
            to the first global op, or up to ``boundary``) must be local: convolutions,
            pooling, padding, pointwise ops, eval-mode BatchNorm, channel LayerNorm...
        tile_size: input tile edge in pixels, halo included: an int, or one int per
            spatial dim. It bounds the memory of one tile.
        boundary: optional node name or module path of the last op to stream; the rest
            runs normally on the assembled feature map.
        input_transform: optional ``transform(tile, dtype)`` applied to every tile on the
            trunk's device before the trunk, e.g. ``fxstream.Normalize(mean, std,
            scale=1/255)`` to feed a host-resident ``uint8`` image.
        output_device: where the trunk output and its gradient are assembled (default:
            the trunk's device); ``"cpu"`` for dense outputs as large as the image.
        progress: show a tqdm bar over the tiles of every pass (needs tqdm).
        memory_budget, input_shape: with ``tile_size="auto"``, the largest square tile
            whose predicted training peak for inputs of ``input_shape`` (N, C, *spatial)
            fits ``memory_budget`` (bytes or e.g. ``"8GiB"``); with ``boundary="auto"``,
            the streamed prefix predicted fastest within the budget (see ``fxstream.auto``).
        verbose: print the automatic choice and the reason.
        schedule: how the tiles run (see :mod:`fxstream.schedule`): ``"carry"`` (the
            default) computes every activation once and carries thin stripes between
            neighbouring tiles; ``"recompute"`` makes tiles independent by recomputing
            each tile's halo. Both are exact.

    After a call, ``smodel.last_stats`` summarises the streaming work (tiles, time,
    peak memory); ``fxstream.serial_backward`` resets it at the start of each step.

    Raises:
        UnsupportedOpError: a non-local or unknown op inside the trunk.
        TileSizeError: ``tile_size`` malformed or smaller than the receptive field.
        BoundaryError: ``boundary`` names nothing streamable, or the trunk has several outputs.
        TraceError: torch.fx cannot trace the model.

    Example::

        >>> smodel = fxstream.compile(torchvision.models.resnet18().eval(), tile_size=512)
        >>> smodel(torch.randn(1, 3, 1000, 700)).shape
        torch.Size([1, 1000])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fxstream.compile expects an nn.Module, got {type(model).__name__}")
    if tile_size == "auto" or boundary == "auto":
        from .auto import choose

        choice = choose(model, tile_size, boundary, memory_budget, input_shape, schedule=schedule)
        tile_size, boundary = choice.tile_size, choice.boundary
        if verbose:
            print(choice.reason)
    validate_tile_size(tile_size)
    schedule = as_schedule(schedule)
    device = torch.device(output_device) if output_device is not None else None
    settings = StreamSettings(input_transform=input_transform, output_device=device, progress=progress)
    return StreamedModule(model, tile_size, boundary, settings, schedule)
