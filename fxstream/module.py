"""The drop-in module returned by :func:`fxstream.compile`, and the pipeline that builds it."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
import torch.fx as fx
import torch.nn as nn

from . import hooks
from .analysis.analyze import Analysis
from .distributed import TileGroup
from .errors import ArgumentError, BoundaryError, BranchError, ContractError, TileSizeError, user_error
from .frontend.tracecheck import probe_input
from .io import arrays
from .io.transfer import Normalize
from .memory.auto import choose
from .planning.lower import lower
from .planning.plan import Plan
from .planning.schedule import Schedule, as_schedule
from .planning.trunk import TrunkGeometry
from .runtime import live
from .runtime.codegen import StreamedTrunk, graph_module, outer_graph, tile_graph
from .runtime.progress import StreamStats
from .runtime.settings import StreamSettings

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
    hooks: hooks.HookRule
    module: fx.GraphModule | None = None  # built on demand
    bindings: tuple = ()  # live.Binding of each GraphModule: keeps their members current


def build_program(
    model: nn.Module, tile_size: TileSize, boundary: str | tuple[str, ...] | None, schedule=None, sample=None
) -> Program:
    low = lower(model, tile_size, boundary, schedule, sample)  # trace -> analyse -> geometry -> plan
    tiles, outer = tile_graph(low.analysis, low.geometry), outer_graph(low.analysis)  # -> fx.Graph, fx.Graph
    return Program(low.analysis, low.geometry, low.plan, low.schedule, tiles, outer, hooks.hook_rule(low.analysis))


def validate_tile_size(tile_size: TileSize) -> None:
    values = tile_size if isinstance(tile_size, tuple) else (tile_size,)
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise TileSizeError(
            f"tile_size must be a positive int or a tuple of positive ints (one per spatial dim), got {tile_size!r}"
        )


class StreamedModule(nn.Module):
    """A model whose trunk runs tile by tile, with the outputs and gradients of the original.

    It shares the original model's members: its ``_modules``, ``_parameters`` and
    ``_buffers`` are the model's own dictionaries, so ``state_dict()`` keys match,
    optimizers built on ``model.parameters()`` keep working, and a member assigned on
    either object (``model.conv1.weight = ...``, ``smodel.layer1 = ...``) is seen by
    both. Every call computes with the current members: replaced tensors are rebound
    into the generated modules, and a changed module tree (or a replaced tensor of
    another shape) is traced and compiled again. ``.train()``/``.eval()`` recompile
    for the new mode on the next call (and raise :class:`UnsupportedOpError` there if
    the new mode is not streamable). Hooks follow :mod:`fxstream.hooks`. Pickling keeps
    the model and the configuration; the programs are compiled again after loading.
    See ``docs/contract.md``.
    """

    def __init__(
        self, model: nn.Module, tile_size: TileSize, boundary: str | None = None, settings=None, schedule=None
    ):
        super().__init__()
        self._share(model)
        # Plain attributes (not registered): the compiled programs are derived state.
        self.__dict__["_source"] = model
        self.__dict__["_config"] = (tile_size, boundary, as_schedule(schedule))
        self.__dict__["settings"] = settings if settings is not None else StreamSettings()
        self._reset()
        self._current()  # compile now, so errors surface at compile time

    @property
    def training(self) -> bool:
        """The original model's own ``training`` flag: one flag for both objects, so that
        ``smodel.eval()`` also puts the model's own ``forward`` in eval mode (and the other way)."""
        source = self.__dict__.get("_source")
        return source.training if source is not None else self.__dict__.get("training", True)

    @training.setter
    def training(self, mode: bool) -> None:
        source = self.__dict__.get("_source")
        if source is None:  # nn.Module.__init__, before the model is attached
            self.__dict__["training"] = mode
        else:
            source.training = mode

    def _share(self, model: nn.Module) -> None:
        for slot in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[slot] = model.__dict__[slot]

    def _reset(self) -> None:
        self.__dict__["_programs"] = {}
        self.__dict__["_structure"] = None
        self.__dict__.setdefault("_sample", None)  # (shape, dtype) of the input traced at; None: the probe
        self.__dict__.setdefault("_branched", set())  # input keys that branch otherwise than the probe
        self.__dict__.setdefault("_last_key", None)  # the (shape, dtype) of the last call

    def _mode_key(self) -> tuple:
        return tuple(m.training for m in self.modules())

    def program(self) -> Program:
        """The compiled program for the current module tree and train/eval flags."""
        tree = live.structure(self)
        if tree != self._structure:  # a submodule replaced, added or removed: trace again
            self.__dict__["_programs"] = {}
            self.__dict__["_structure"] = tree
        key = (self._mode_key(), self._sample)
        if key not in self._programs:
            sample = self._sample and torch.empty(self._sample[0], dtype=self._sample[1], device="meta")
            self._programs[key] = build_program(self._source, *self._config, sample=sample)
        return self._programs[key]

    @property
    def plan(self) -> Plan:
        """The streaming plan (receptive field, halos, block per tile) for the current mode."""
        return self.program().plan

    @property
    def schedule(self) -> Schedule:
        """How the tiles run: ``Schedule('carry', stripes=...)`` or ``Schedule('recompute')``."""
        return self.program().schedule

    @property
    def streamed_trunk(self) -> StreamedTrunk:
        """The streamed trunk; ``streamed_trunk.tile.code`` is the generated per-tile code."""
        return self._current().fxstream_trunk

    @property
    def code(self) -> str:
        """The generated code: the outer module, then the per-tile module."""
        gm = self._current()
        return f"# outer module\n{gm.code}\n# per-tile module\n{gm.fxstream_trunk.tile.code}"

    def shape_plan(self, *spatial_size: int):
        """The tiles that an input of this spatial size is cut into (with the batch, channels
        and dtype of the last call, or of the probe input)."""
        size = tuple(spatial_size)
        return self._at_sample(self._key_at(size), lambda: self.streamed_trunk.shape_plan(size))

    def _key_at(self, size: tuple[int, ...]) -> tuple | None:
        last = self._last_key
        if last is None:
            probe = probe_input(self._source)
            last = None if probe is None else (tuple(probe.shape), probe.dtype)
        return None if last is None else ((*last[0][:2], *size), last[1])

    @torch.compiler.disable
    def _current(self) -> fx.GraphModule:
        """The outer GraphModule, checked against the model as it is now (opaque to dynamo)."""
        _check_transforms()
        program = self.program()
        hooks.check(program.hooks, self, self._source)
        if program.module is None or hooks.stale(program.module, program.hooks, self):  # a head hook came or went
            program.module, program.bindings = self._build(program)
        if not all(binding.refresh() for binding in program.bindings):  # a tensor changed shape
            self.__dict__["_structure"] = None
            return self._current()
        return program.module

    def _build(self, program: Program) -> tuple[fx.GraphModule, tuple[live.Binding, ...]]:
        tile = graph_module(self, program.tile_graph, "StreamedTile")
        trunk = StreamedTrunk(tile, program.geometry, program.plan, self.settings, program.schedule)
        # The streaming call is opaque to torch.compile (it runs eagerly); the head is compiled.
        trunk.forward = torch.compiler.disable(hooks.around(trunk.forward, self, program.hooks))
        outer_graph = hooks.collapse_hooked_calls(program.outer_graph, program.hooks, self)  # hooked head modules
        outer = graph_module(self, outer_graph, "StreamedModel", {"fxstream_trunk": trunk})
        bindings = (
            live.Binding(tile, self, live.targets(program.tile_graph)),
            live.Binding(outer, self, live.targets(program.outer_graph, skip=("fxstream_trunk",))),
        )
        return outer, bindings

    def forward(self, *args, **kwargs):
        key = _input_key(args[0] if args else None)
        self.__dict__["_last_key"] = key

        def run():
            module = self._current()  # compiling may touch buffers (the trace check restores them)
            versions = [(b, b._version) for b in self.buffers()]
            try:
                return module(*args, **kwargs)
            except BranchError:
                if key not in self._branched and any(b._version != v for b, v in versions):
                    raise user_error(
                        ContractError,
                        f"the first call at input size {key[0]} took another branch than the traced one after the "
                        "model had updated its buffers (e.g. a training-mode BatchNorm in the head): running it "
                        "again at this size would update them twice",
                        fix="call the compiled module once at this size in eval mode (model.eval()), then train",
                    ) from None
                raise

        return self._at_sample(key, run)

    def _at_sample(self, key: tuple | None, run: Callable):
        """``run()`` with the program traced for inputs like ``key`` (shape, dtype). Traced
        on the probe, a model whose Python branches on sizes can take another branch at
        ``key`` (:class:`BranchError`, raised before the branch's result is used): then it
        is traced again at that size, and ``run`` retried from the same random state."""
        self.__dict__["_sample"] = key if key in self._branched else None
        rng = _RandomState()
        try:
            return run()
        except BranchError:
            if key is None or key in self._branched:
                raise
            rng.restore()  # the retry draws what the first attempt drew
            self._branched.add(key)
            self.__dict__["_sample"] = key
            return run()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_programs"], state["_structure"] = {}, None
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._reset()

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


# torch.load(path, weights_only=True) of a saved compiled module unpickles no code but what is
# allowed: fxstream allows its own classes here; the model's module classes (nn.Conv2d, the
# user's own) are the caller's to allow (torch.serialization.safe_globals; docs/contract.md).
if hasattr(torch.serialization, "add_safe_globals"):  # torch >= 2.4
    torch.serialization.add_safe_globals([StreamedModule, Schedule, StreamSettings, StreamStats, Normalize])


def _input_key(x) -> tuple | None:
    """``(shape, torch dtype)`` of a tensor or array-like input, or None."""
    if not arrays.is_image(x):
        return None
    dtype = x.dtype if isinstance(x.dtype, torch.dtype) else arrays.torch_dtype(x.dtype)
    return tuple(int(n) for n in x.shape), dtype


class _RandomState:
    """The CPU generator's state, and the current CUDA device's where CUDA is in use."""

    def __init__(self) -> None:
        self.cpu = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None

    def restore(self) -> None:
        torch.random.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _check_transforms() -> None:
    """torch.func transforms (grad, vmap, jvp...) cannot see through the streaming call."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        raise user_error(
            ContractError,
            "a compiled module cannot run under a torch.func transform (grad, vmap, jacrev, jvp): the streamed "
            "trunk is an autograd.Function that recomputes its tiles in backward",
            fix="use torch.func.functional_call(smodel, params, x) with torch.autograd.grad / .backward() instead",
        )


def compile(
    model: nn.Module,
    tile_size: TileSize,
    *,
    boundary: str | Sequence[str] | None = None,
    input_transform: Callable | None = None,
    output_device: str | torch.device | None = None,
    progress: bool = False,
    memory_budget: int | str | None = None,
    input_shape: tuple[int, ...] | None = None,
    verbose: bool = False,
    schedule: str | Schedule | None = None,
    tile_group=None,
) -> StreamedModule:
    """Compile ``model`` so its local trunk runs tile by tile with exact gradients.

    Args:
        model: any ``nn.Module`` that ``torch.fx`` can trace. Its trunk (everything up
            to the first global op, or up to ``boundary``) must be local: convolutions,
            pooling, padding, pointwise ops, eval-mode BatchNorm, channel LayerNorm...
        tile_size: input tile edge in pixels, halo included: an int, or one int per
            spatial dim. It bounds the memory of one tile.
        boundary: optional node name or module path of the last op to stream, or a list of
            them (one per trunk output, e.g. ``["layer1", "layer4"]``); the rest runs
            normally on the assembled feature maps. Default: everything up to the first
            global op. Every trunk tensor the rest of the model reads is a trunk output:
            each tile writes its block of each one, and each is assembled whole.
        input_transform: optional ``transform(tile, dtype)`` applied to every tile on the
            trunk's device before the trunk, e.g. ``fxstream.Normalize(mean, std,
            scale=1/255)`` to feed a host-resident ``uint8`` image.
        output_device: where the trunk output and its gradient are assembled (default:
            the trunk's device); ``"cpu"`` for dense outputs as large as the image.
        progress: show a tqdm bar over the tiles of every pass (needs tqdm).
        memory_budget, input_shape: with ``tile_size="auto"``, the largest square tile
            whose predicted training peak for inputs of ``input_shape`` (N, C, *spatial)
            fits ``memory_budget`` (bytes or e.g. ``"8GiB"``) on the model's device; with
            ``boundary="auto"``, the streamed prefix predicted fastest within the budget;
            under carry with ``stripes="auto"``, also where the stripes live: on the device
            if they fit, else in host memory (an accelerator) or banded (see
            ``fxstream.memory.auto``).
        verbose: print the automatic choice and the reason.
        schedule: how the tiles run (see :mod:`fxstream.planning.schedule`): ``"carry"`` (the
            default) computes every activation once and carries thin stripes between
            neighbouring tiles; ``"recompute"`` makes tiles independent by recomputing
            each tile's halo. Both are exact. ``fxstream.Schedule("carry", stripes=...)``
            says where carry keeps its stripes for the backward pass: ``"auto"`` (the
            default: in host memory on an accelerator, on the device on a CPU),
            ``"device"``, ``"host"`` or ``"banded"`` (rebuilt band by band; ``band_rows=``).
        tile_group: a ``torch.distributed`` ProcessGroup (or a 1-D DeviceMesh) whose ranks
            all receive the same image and split its tiles into bands of tile rows; the
            trunk output and the gradients are those of one process on every rank (see
            :mod:`fxstream.distributed`). Default None: this process runs every tile.

    After a call, ``smodel.last_stats`` summarises the streaming work (tiles, time,
    peak memory); ``fxstream.serial_backward`` resets it at the start of each step.

    Raises:
        UnsupportedOpError: a non-local or unknown op, or a module hook, inside the trunk.
        TileSizeError: ``tile_size`` malformed or smaller than the receptive field.
        BoundaryError: ``boundary`` is not a string or a list of strings, or names nothing
            streamable.
        ArgumentError: ``model`` is not an nn.Module; ``memory_budget``/``input_shape`` given
            without ``"auto"``; a malformed ``output_device`` (not a device, ``"meta"``, a
            device this process does not see) or ``input_transform`` (not callable as
            ``transform(tile, dtype)``).
        TraceError: torch.fx cannot trace the model.

    Example::

        >>> smodel = fxstream.compile(torchvision.models.resnet18().eval(), tile_size=512)
        >>> smodel(torch.randn(1, 3, 1000, 700)).shape
        torch.Size([1, 1000])
    """
    _check_arguments(model, tile_size, boundary, memory_budget, input_shape, input_transform)
    boundary = boundary if boundary is None or isinstance(boundary, str) else tuple(boundary)
    schedule = as_schedule(schedule)  # -> Schedule
    if tile_size == "auto" or boundary == "auto":  # -> Choice: a tile size, a boundary and a schedule
        device = _device(output_device)
        choice = choose(
            model,
            tile_size,
            boundary,
            memory_budget,
            input_shape,
            schedule=schedule,
            output_device=None if device is None else device.type,
        )
        tile_size, boundary, schedule = choice.tile_size, choice.boundary, choice.schedule
        if verbose:
            print(choice.reason)
    validate_tile_size(tile_size)
    settings = StreamSettings(  # -> the run-time settings all programs of the module share
        input_transform=input_transform,
        output_device=_device(output_device),
        progress=progress,
        tile_group=TileGroup(tile_group) if tile_group is not None else None,
    )
    return StreamedModule(model, tile_size, boundary, settings, schedule)  # build_program: trace -> ... -> generate


def _check_arguments(model, tile_size, boundary, memory_budget, input_shape, input_transform) -> None:
    """Reject arguments that are malformed or that nothing would read."""
    if not isinstance(model, nn.Module):
        raise user_error(ArgumentError, f"fxstream.compile expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, StreamedModule):
        raise user_error(
            ArgumentError, "this model is already compiled", fix="pass the original model to fxstream.compile"
        )
    several = isinstance(boundary, (list, tuple)) and boundary and all(isinstance(b, str) for b in boundary)
    if boundary is not None and not isinstance(boundary, str) and not (several and "auto" not in boundary):
        raise user_error(
            BoundaryError,
            f"boundary must be a node name or module path (a string), a non-empty list of them, or 'auto', "
            f"got {boundary!r}",
            fix="e.g. boundary='layer3', boundary='layer3.1.relu' or boundary=['layer1', 'layer4']; "
            "`fxstream plan --format dot` shows the names",
        )
    automatic = tile_size == "auto" or boundary == "auto"
    for name, value in (("memory_budget", memory_budget), ("input_shape", input_shape)):
        if value is not None and not automatic:
            raise user_error(
                ArgumentError,
                f"{name}={value!r} is only used by tile_size='auto' or boundary='auto', and both are fixed here",
                fix=f"pass tile_size='auto' (or boundary='auto') to choose within it, or drop {name}",
            )
    if input_transform is not None and not callable(input_transform):
        raise user_error(
            ArgumentError, f"input_transform must be callable as transform(tile, dtype), got {input_transform!r}"
        )
    if input_transform is not None:
        _check_transform(input_transform)


def _check_transform(transform: Callable) -> None:
    """Every tile is passed as ``transform(tile, dtype)``: check that it takes both."""
    try:
        signature = inspect.signature(transform.forward if isinstance(transform, nn.Module) else transform)
    except (TypeError, ValueError):  # no signature (some builtins): it is called as is
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise user_error(
            ArgumentError,
            f"input_transform={transform!r} cannot be called as transform(tile, dtype): its signature is {signature}",
            fix="take the tile and the trunk's floating dtype (e.g. lambda tile, dtype: tile.to(dtype) / 255), "
            "or pass fxstream.Normalize(mean, std, scale=...)",
        ) from None


def _device(output_device: str | torch.device | None) -> torch.device | None:
    if output_device is None:
        return None
    try:
        device = torch.device(output_device)
    except (RuntimeError, TypeError) as exc:
        raise user_error(ArgumentError, f"output_device={output_device!r} is not a device: {exc}") from None
    if device.type == "meta":
        raise user_error(
            ArgumentError,
            f"output_device={output_device!r}: the meta device holds no values, only shapes",
            fix="pass 'cpu', a CUDA device, or None (the trunk's device)",
        )
    count = getattr(getattr(torch, device.type, None), "device_count", None)
    if device.type != "cpu" and callable(count) and (device.index or 0) >= count():
        raise user_error(
            ArgumentError,
            f"output_device={output_device!r} is {device}, but this process sees {count()} {device.type} devices",
            fix="pass 'cpu', an existing device, or None (the trunk's device)",
        )
    return device
