"""The one exception hierarchy of fxstream, and the one builder of its messages.

Every error a user can trigger is a subclass of :class:`FxStreamError`. Messages
name what went wrong, where (node, module path, source line) and how to fix it, in
one layout built by :func:`user_error`::

    cannot stream GroupNorm: it normalises over the whole image.
      node 'norm' (%norm : [num_users=1] = call_module[target=norm](args = (%conv,), kwargs = {}))
      in module 'block.norm'
      at model.py:12: y = self.norm(self.conv(x))
      fix: pass boundary=... to stream only the part before it
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.fx as fx


class FxStreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class TraceError(FxStreamError):
    """Raised by ``compile`` when torch.fx cannot trace the model (data-dependent
    control flow, unsupported Python constructs)."""


class UnsupportedOpError(FxStreamError):
    """Raised by ``compile`` when the streamed trunk contains an op that is not
    local (its output at one pixel depends on the whole image, e.g. BatchNorm in
    training mode, GroupNorm, squeeze-excitation) or that fxstream does not know;
    and by ``compile`` or the first call after registration when a hook sits on a
    module inside the trunk (see ``docs/contract.md``).

    Attributes: ``node`` (FX node name), ``module_path`` (dotted path of the
    module the op belongs to, or ``""``), ``op`` (a short description), ``boundary``
    (the ``boundary=`` of the largest streamable prefix, or None).
    """

    def __init__(self, message: str, *, node: str = "", module_path: str = "", op: str = "", boundary=None):
        super().__init__(message)
        self.node = node
        self.module_path = module_path
        self.op = op
        self.boundary = boundary


class StatisticsError(UnsupportedOpError):
    """Raised by ``compile`` when the trunk holds more dependent levels of global statistics
    (GroupNorm, squeeze-excitation, pooling branches...) than ``max_levels=``: each level adds
    a streamed pass forward and one backward. The message gives the level count, the first
    and last statistic, the predicted step ratio and the fixes. Attributes: those of
    :class:`UnsupportedOpError` (``boundary``: the largest prefix within ``max_levels``),
    ``levels``, ``max_levels`` and ``predicted_step_ratio``."""

    def __init__(self, message: str, *, levels: int = 0, max_levels: int = 0, predicted_step_ratio: float = 0.0, **kw):
        super().__init__(message, **kw)
        self.levels = levels
        self.max_levels = max_levels
        self.predicted_step_ratio = predicted_step_ratio


class BoundaryError(FxStreamError):
    """Raised by ``compile`` when ``boundary=`` is not a string, names nothing
    streamable, or when the trunk would have several outputs used by the head."""


class TileSizeError(FxStreamError):
    """Raised by ``compile`` when ``tile_size`` is malformed or too small for the
    trunk's receptive field, and when an input is planned whose tiles would not fit
    the tile size or would number more than ``fxstream.tiling.MAX_TILES``. ``minimum``
    holds the smallest valid size per spatial dimension when it is known."""

    def __init__(self, message: str, minimum: tuple[int, ...] | None = None):
        super().__init__(message)
        self.minimum = minimum


class InputShapeError(FxStreamError):
    """Raised on the forward pass when the input does not fit the compiled
    module: wrong number of dimensions, or too small for the network."""


class ArgumentError(FxStreamError, ValueError):
    """Raised when an argument of ``compile``, ``serial_backward``, ``train_step`` or
    the ``fxstream`` command line is malformed or inconsistent with the others
    (e.g. ``memory_budget`` without ``tile_size="auto"``). Also a ``ValueError``."""


class ContractError(FxStreamError):
    """Raised when the compiled module is used outside its contract (see
    ``docs/contract.md``): double backward (``create_graph=True``), ``torch.func``
    transforms over the streamed trunk, or a model changed after compile in a way
    the compiled module cannot follow."""


class InputChangedError(ContractError):
    """Raised by the backward pass when an array-like image (a numpy buffer, a memmap, a
    file opened with ``fxstream.open_image``) no longer holds the pixels the forward pass
    read: the backward pass reads every tile again, and would mix two images. Attributes:
    ``region`` (the tile's image region, ``[lo, hi)`` per spatial axis)."""

    def __init__(self, message: str, *, region: tuple = ()):
        super().__init__(message)
        self.region = region


class TileGroupError(FxStreamError):
    """Raised on every rank of a tile group (``compile(..., tile_group=...)``) when a
    collective fails or times out (a rank died, or stopped calling the model), when the
    ranks got different images of the same shape, or when the group cannot split the input
    (fewer tile rows than ranks)."""


class PlannerError(FxStreamError):
    """An internal inconsistency between the plan and the computed tiles. It
    means a bug in fxstream: please report it with the model."""


E = TypeVar("E", bound=FxStreamError)


class PerformanceWarning(UserWarning):
    """A setting that makes streaming much slower than it needs to be (e.g. more CPU threads
    than free cores); the message names the fix. Shown once per process."""


def user_error(
    cls: type[E],
    what: str,
    *,
    node: Any = None,
    module_path: str | None = None,
    source: str | None = None,
    fix: str | None = None,
    **fields: Any,
) -> E:
    """An error of class ``cls`` whose message is ``what``, then where (node, module
    path, the user's source line) and the fix, one per indented line.

    ``node`` is an ``fx.Node`` (its name, module path and source line are looked up;
    ``module_path``/``source`` override them) or a plain name. ``fields`` go to the
    class's constructor (``UnsupportedOpError`` gets ``node``, ``module_path`` and
    ``op``; pass ``op=...``). Returns the error: ``raise user_error(...)``.
    """
    name, path, line, described = _where(node, module_path, source)
    lines = [what.rstrip()]
    if described:
        lines.append(f"  {described}")
    elif name:
        lines.append(f"  node '{name}'")
    if path:
        lines.append(f"  in module '{path}'")
    if line:
        lines.append(f"  at {line}")
    if fix:
        lines.append(f"  fix: {fix}")
    if issubclass(cls, UnsupportedOpError):
        fields = {"node": name or "", "module_path": path or "", "op": "", **fields}
    return cls("\n".join(lines), **fields)


def _where(node: Any, path: str | None, source: str | None) -> tuple[str, str, str, str]:
    """(node name, module path, source line, node description) for the message."""
    if node is None or isinstance(node, str):
        return node or "", path or "", source or "", ""
    path = path if path is not None else module_path(node)
    line = source if source is not None else source_line(node)
    return node.name, path, line, f"node '{node.name}' ({node.format_node()})"


def first_order(backward: Callable) -> Callable:
    """Decorate an autograd.Function's ``backward`` (outside ``once_differentiable``) to
    raise :class:`ContractError` under ``create_graph=True``, where the engine runs
    backward with grad mode on: the tile gradients are computed, not differentiable."""

    @functools.wraps(backward)
    def checked(ctx, *grads):
        if any(_batched(g) for g in grads):
            raise user_error(
                ContractError,
                "batched gradients through the streamed trunk are not supported (autograd.grad(..., "
                "is_grads_batched=True), autograd.functional.jacobian/hessian(..., vectorize=True)): they run the "
                "backward pass under vmap, and the tiles' backward pass accumulates gradients in place",
                fix="compute one backward pass per row (is_grads_batched=False, or jacobian(..., vectorize=False))",
            )
        if torch.is_grad_enabled():
            raise user_error(
                ContractError,
                "double backward through the streamed trunk is not supported (create_graph=True): its gradients "
                "are computed tile by tile and are not themselves differentiable",
                fix="compute higher-order terms (gradient penalties, Hessian-vector products) with the plain model, "
                "or put the part that needs them after boundary=...",
            )
        return backward(ctx, *grads)

    return checked


def _batched(t: Any) -> bool:
    """Whether ``t`` is a vmap-batched tensor (functorch's, or the legacy vmap's that
    ``is_grads_batched=True`` uses)."""
    functorch = torch._C._functorch
    checks = (getattr(functorch, "is_batchedtensor", None), getattr(functorch, "is_legacy_batchedtensor", None))
    return isinstance(t, torch.Tensor) and any(check is not None and check(t) for check in checks)


class BranchError(InputShapeError):
    """Raised before any tile runs when an input size makes the model take another branch
    than the traced one (Python control flow on sizes, answered from the trace's sample).
    Attributes: ``where`` (the model's source line), ``value`` (this size's answer) and
    ``expected`` (the traced one). Tracing again at that size (``fxstream.trace(model,
    sample)`` with a meta-device sample of the input's shape) gives that size's branch."""

    def __init__(self, message: str, *, where: str = "", value: Any = None, expected: Any = None):
        super().__init__(message)
        self.where = where
        self.value = value
        self.expected = expected


class ChannelError(InputShapeError):
    """Raised on the forward pass, before any pixel is read, when the input's channel
    count does not match what the trunk's first convolutions (or a per-channel
    ``input_transform``) read. Attributes: ``expected``, ``got``, ``node``,
    ``module_path`` (None where the transform is the mismatch)."""

    def __init__(
        self,
        message: str,
        *,
        expected: int | None = None,
        got: int | None = None,
        node: str | None = None,
        module_path: str | None = None,
    ):
        super().__init__(message)
        self.expected = expected
        self.got = got
        self.node = node
        self.module_path = module_path


class ImageFileError(FxStreamError):
    """Raised by ``fxstream.open_image`` when a file cannot be read as an image: it is
    missing, not an image format any installed reader knows, or its layout is not one
    2D image (several Z planes or time points). Attribute: ``path``."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


class LevelError(ImageFileError):
    """Raised by ``fxstream.open_image`` when the file has no pyramid level ``level``.
    Attributes: ``path``, ``level``, ``levels`` (the (height, width) of each level)."""

    def __init__(self, message: str, *, path: str, level: int, levels: tuple[tuple[int, int], ...]):
        super().__init__(message, path=path)
        self.level = level
        self.levels = levels


# --- Where a node comes from: its module and the user's source line -------------------

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that created ``node`` ('' at top level)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    # torch 2.x stores (path, type); older releases stored only the type keyed by path.
    if isinstance(last, tuple):
        return str(last[0])
    return str(list(stack.keys())[-1])


def source_line(node: fx.Node) -> str:
    """The user's source line that created ``node``, as 'file:line: code', or ''.

    FX records the whole stack; the user's line is the innermost frame outside
    torch itself (torchvision and user code count as the user's)."""
    lines = (node.stack_trace or "").strip().splitlines()
    frames = []
    for i, line in enumerate(lines):
        text = line.strip()
        if text.startswith("File "):
            parts = text.split(",")
            path = parts[0][len("File ") :].strip('"')
            number = parts[1].replace("line", "").strip() if len(parts) > 1 else "?"
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            frames.append((path, number, code))
    user = [f for f in frames if not is_internal_file(f[0])]
    if not user:
        return ""
    path, number, code = user[-1]
    return f"{path}:{number}: {code}"


def is_internal_file(path: str) -> bool:
    """A frame of torch itself or of fxstream (its tracers appear in every traced stack)."""
    return _is_torch_file(path) or os.path.abspath(path).startswith(_PACKAGE_DIR + os.sep)


def _is_torch_file(path: str) -> bool:
    parts = path.replace("\\", "/").split("/")
    return "torch" in parts[:-1] and "site-packages" in parts or "/torch/" in path and "/fx/" in path


def describe(node: fx.Node) -> str:
    """Node, module path and source line, for error messages."""
    path = module_path(node)
    text = f"node '{node.name}' ({node.format_node()})"
    if path:
        text += f"\n  in module '{path}'"
    src = source_line(node)
    if src:
        text += f"\n  at {src}"
    return text
