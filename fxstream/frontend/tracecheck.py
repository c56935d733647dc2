"""Checks that the traced graph is the model: the same outputs on a probe, no side effects.

* :func:`check_trace` runs the traced graph and the eager model on a small probe input
  (:func:`probe_input`: the first convolution's channels, 64 pixels per axis) and raises
  :class:`TraceError` naming the first output that differs. On a meta-device probe (a trace
  at a real input size, see :class:`~fxstream.errors.BranchError`) it compares shapes. torch.fx bakes Python decisions
  into the graph at trace time; when one of them depended on the input (a branch on tensor
  values, ``torch.jit.isinstance`` on a traced tensor), the graph is another model.
* :func:`record_mutations` rejects a forward that assigns module attributes
  (``self.calls += 1``): the assignment happens once, at trace time, and never again.
* :func:`check_inplace_state` rejects in-place ops on parameters and buffers
  (``self.count.add_(1)``), which the streamed module would not run once per call.

Buffers changed by the probe runs (BatchNorm statistics in training mode) are restored,
and both runs see the same random numbers.
"""

from __future__ import annotations

import contextlib
import operator
import traceback
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import BranchError, TraceError, UnsupportedOpError, describe, is_internal_file, module_path
from ..ops.table import VIEW_FUNCTIONS, VIEW_METHODS

PROBE_SIZE = {1: 256, 2: 64, 3: 32}
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_INPLACE_OPERATORS = (operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.setitem)


def probe_input(model: nn.Module) -> torch.Tensor | None:
    """A small input for ``model``: batch 1, the first convolution's input channels, dtype and
    device, ``PROBE_SIZE`` pixels per axis. None when the model has no convolution."""
    conv = next((m for m in model.modules() if isinstance(m, _CONVS)), None)
    if conv is None:
        return None
    ndim = conv.weight.dim() - 2
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, conv.in_channels, *(PROBE_SIZE[ndim],) * ndim, generator=gen, dtype=conv.weight.dtype)
    return x.to(conv.weight.device)


def check_trace(model: nn.Module, gm: fx.GraphModule, probe: torch.Tensor | None = None) -> Any:
    """Raise :class:`TraceError` when ``gm`` and ``model`` differ on ``probe``; returns the eager
    model's output (None when not checked). Models the probe does not fit (the eager model
    raises on it) are not checked."""
    probe = probe if probe is not None else probe_input(model)
    if probe is None:
        return None
    try:
        expected = _run(model, probe)
    except Exception:  # the probe does not fit this model: nothing to compare
        return None
    try:
        actual = _run(gm, probe)
    except Exception as exc:
        raise TraceError(
            f"the traced graph of {type(model).__name__} fails on a {tuple(probe.shape)} probe input on which the "
            f"model itself runs ({type(exc).__name__}: {exc}).\n{_CAUSES}"
        ) from exc
    for name, a, b in _leaves(actual, expected):
        if not _same(a, b):
            raise TraceError(
                f"the traced graph of {type(model).__name__} is not the model: its output {name} differs from "
                f"the eager model's on a {tuple(probe.shape)} probe input ({_difference(a, b)}).\n{_CAUSES}"
            )
    return expected


_CAUSES = (
    "  Usual causes: Python control flow on tensor values (torch.fx takes one branch at trace time), "
    "torch.jit.isinstance or isinstance tests on traced tensors, or state read from outside the model.\n"
    "  fix: express the branch with tensor ops (torch.where), or keep it out of forward()."
)


def to_meta(value: Any) -> Any:
    """A tensor's meta-device copy (shape, dtype, no data); any other value as it is."""
    return value.to("meta") if isinstance(value, torch.Tensor) and value.device.type != "meta" else value


def meta_call(module: nn.Module, args: tuple, kwargs: dict | None = None) -> Any:
    """``module(*args, **kwargs)`` with its parameters and buffers on the meta device: the
    shapes of a call at any size, without memory or compute."""
    state = {name: to_meta(t) for name, t in [*module.named_parameters(), *module.named_buffers()]}
    return torch.func.functional_call(module, state, tuple(args), kwargs or {})


def _run(module: nn.Module, x: torch.Tensor) -> Any:
    """``module(x)`` without gradients, with a fixed seed, restoring every buffer afterwards
    (on a meta-device ``x``, with the parameters and buffers on meta too)."""
    with torch.no_grad(), side_effects_undone(module, x.device):
        torch.manual_seed(0)
        return meta_call(module, (x,)) if x.device.type == "meta" else module(x)


@contextlib.contextmanager
def side_effects_undone(module: nn.Module, device: torch.device) -> Iterator[None]:
    """A probe run of ``module`` leaves no trace: its buffers (BatchNorm statistics in
    training mode) are restored, and its random draws (dropout) come from a forked generator."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


def _leaves(actual: Any, expected: Any, name: str = "") -> Iterator[tuple[str, Any, Any]]:
    if isinstance(expected, dict) and isinstance(actual, dict) and actual.keys() == expected.keys():
        for key in expected:
            yield from _leaves(actual[key], expected[key], f"{name}[{key!r}]")
    elif isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)) and len(actual) == len(expected):
        for i, (a, b) in enumerate(zip(actual, expected)):
            yield from _leaves(a, b, f"{name}[{i}]")
    else:
        yield name or "(the only output)", actual, expected


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.device.type == "meta" or b.device.type == "meta":  # a meta-device probe: shapes only
            return a.device == b.device
        if not a.is_floating_point():
            return torch.equal(a, b)
        scale = b.abs().max().item() if b.numel() else 0.0
        return bool(((a - b).abs() <= 1e-5 * max(scale, 1e-30) + 1e-12).all()) or torch.equal(a, b)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    return type(a) is type(b) and a == b


def _difference(a: Any, b: Any) -> str:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        scale = b.abs().max().item() or 1.0
        return f"relative error {(a - b).abs().max().item() / scale:.2e}"
    return f"{type(a).__name__} instead of {type(b).__name__}"


def size_guard(value: Any, expected: Any, where: str) -> Any:
    """A decision the concrete tracer took from sizes (see ``fxstream.frontend.trace``): raise
    :class:`~fxstream.errors.BranchError` when ``value`` differs from the traced ``expected``."""
    if (bool(value) if isinstance(expected, bool) else value) != expected:
        raise BranchError(
            f"at this input size the model takes another branch than the traced one: at {where}, Python got "
            f"{value!r} where the traced sample gave {expected!r}, so the compiled module would not be the model.\n"
            "  fix: use input sizes that branch like the sample (often a multiple of the network's stride), "
            "or compute the branch from tensors",
            where=where,
            value=value,
            expected=expected,
        )
    return value


# --- side effects --------------------------------------------------------------------------


class _Assignment(Exception):
    """Raised inside tracing by the patched ``nn.Module.__setattr__``."""


@contextlib.contextmanager
def record_mutations(model: nn.Module, tracer: fx.Tracer) -> Iterator[None]:
    """While tracing, an attribute assignment on one of ``model``'s modules raises
    :class:`UnsupportedOpError` naming the module, the attribute and the source line."""
    paths = {id(m): name for name, m in model.named_modules()}
    original = nn.Module.__setattr__

    def patched(self: nn.Module, name: str, value: Any) -> None:
        if id(self) in paths:
            raise _Assignment(paths[id(self)], name, value, traceback.extract_stack()[:-1])
        original(self, name, value)

    nn.Module.__setattr__ = patched
    try:
        yield
    except _Assignment as assignment:
        raise _assignment_error(*assignment.args) from None
    finally:
        nn.Module.__setattr__ = original


def _assignment_error(path: str, name: str, value: Any, stack: list) -> UnsupportedOpError:
    target = f"{path}.{name}" if path else name
    frames = [f for f in stack if not is_internal_file(f.filename)]
    where = f"\n  at {frames[-1].filename}:{frames[-1].lineno}: {(frames[-1].line or '').strip()}" if frames else ""
    node = value.node.name if isinstance(value, fx.Proxy) else ""
    return UnsupportedOpError(
        f"cannot stream {type(value).__name__} assignment: forward() assigns the module attribute '{target}', "
        f"a side effect that would run once, at compile time, and never again{where}\n"
        "  fix: keep forward() free of state changes (count calls outside the model, or in a hook on the "
        "compiled module)",
        node=node or target,
        module_path=path,
        op="setattr",
    )


def check_inplace_state(gm: fx.GraphModule, before: fx.Node | None) -> None:
    """Reject in-place ops on parameters and buffers (``self.count.add_(1)``) that run before
    ``before`` (the trunk output; None: anywhere)."""
    for node in gm.graph.nodes:
        if node is before:
            return
        if not _inplace(node) or not node.args or not _reads_attribute(node.args[0]):
            continue
        raise UnsupportedOpError(
            f"cannot stream {node.target}: it modifies the parameter or buffer '{_attribute(node.args[0])}' in place, "
            f"a side effect the tiled trunk would repeat per tile or drop.\n  {describe(node)}\n"
            "  fix: keep forward() free of state changes, or pass boundary=... to stream only the part before it",
            node=node.name,
            module_path=module_path(node),
            op=str(getattr(node.target, "__name__", node.target)),
        )


def _inplace(node: fx.Node) -> bool:
    if node.op == "call_method":
        name = str(node.target)
        return name.endswith("_") and not name.endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_OPERATORS or (name.endswith("_") and not name.endswith("__"))
    return False


def _reads_attribute(node: Any) -> bool:
    return _attribute(node) is not None


def _attribute(node: Any) -> str | None:
    """The get_attr target that ``node`` is (a view of), or None."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return str(node.target)
        view = node.target in VIEW_METHODS if node.op == "call_method" else node.target in VIEW_FUNCTIONS
        if not view or not node.args:
            return None
        node = node.args[0]
    return None
