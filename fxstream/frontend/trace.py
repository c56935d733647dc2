"""Stage 1, trace: ``nn.Module`` -> ``torch.fx.GraphModule``.

torch.nn modules stay leaves (``call_module`` nodes) so their runtime state,
such as ``training``, stays visible to the analysis. User modules, including
subclasses of ``nn.Conv2d`` that override ``forward``, are traced through, so
their own logic is never flattened into a plain op. Stack traces are recorded
so errors can point at the user's source line.

Two tracers, tried in order:

* :class:`StreamTracer`, plain symbolic tracing. It treats ``torch.jit.isinstance(x,
  torch.Tensor)`` on a traced tensor as True (torch.fx alone answers False and drops the
  branch: MONAI's BasicUNet loses its skips), traces through modules that are called
  but not registered as submodules (MONAI's FlexibleUNet), instead of failing, and records
  torch factories called with traced values (``torch.zeros(n, c, *x.shape[2:])``,
  ``torch.as_tensor(x)``) as graph nodes, which torch's argument parser alone refuses.
* :class:`ConcreteTracer`, when the first fails on Python control flow (``if h % 32``,
  ``skip.shape[1] != 0``, ``max(x.shape[-2], 7)``, iterating over ``x.shape``). It traces
  the same way, and also runs every op on a small sample input, so each proxy carries a
  concrete value. Where Python needs a ``bool``, ``int``, ``len`` or iteration of a value
  computed from *sizes only* (shape queries, constants, arithmetic on them), the sample's
  answer is used; branches on tensor *values* are still refused. Sizes that flow into pad
  amounts, slices and ``interpolate(size=...)`` stay symbolic, as with the plain tracer, so
  the planner re-evaluates them for each input size.

Why not ``torch.export``: it lowers to ATen ops, without the ``nn.Module`` leaves that the op
table, ``boundary=`` and the error messages are built on, and it specialises every size it
branches on unless the user declares dynamic dims. A concrete-value FX tracer keeps the
graph fxstream already understands, and answers only the size questions Python asks.

The branches taken are those of the sample input (64 pixels per axis, a multiple of the
usual strides). Each answer is recorded in the graph as a ``size_guard`` node; the planner
evaluates the guards that depend on spatial sizes inside the trunk for every input size, and
refuses a size at which the model would branch differently (:class:`InputShapeError`), e.g.
a MONAI BasicUNet at a size that needs its odd-size padding. A guard that reads what the
planner does not know (a batch or channel size, as in smp's Segformer, whose decoder branches
on ``torch.empty([B, 0, H // 2, W // 2]).size(1)``) is checked by the head on every call
instead, when it reads only the image and the trunk outputs. :func:`fxstream.frontend.tracecheck.check_trace`
guards every trace: the traced graph and the eager model must agree on a probe input.

Both tracers trace through a registered module that is not a leaf by its ``forward``, without
its hooks (:mod:`fxstream.hooks` fires hooks; torch.fx alone would run them while tracing and
bake their effect into the graph), and record the call of every registered module
(:class:`ModuleCall`: its path, its arguments and output with nodes named, the nodes it created),
read back with :func:`module_calls`. The hook rule uses them to call a hooked head module for
real. The probe check compares the graph with the eager model with every module hook suspended
(:func:`hooks_suspended`).
"""

from __future__ import annotations

import builtins
import collections
import contextlib
import operator
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.fx as fx
from torch.fx._symbolic_trace import _maybe_revert_all_patches

from ..errors import FxStreamError, TraceError, is_internal_file
from .tracecheck import check_trace, meta_call, probe_input, record_mutations, side_effects_undone, size_guard, to_meta

_METADATA_METHODS = ("size", "dim", "numel", "nelement")
_METADATA_ATTRIBUTES = ("shape", "ndim", "dtype", "device", "is_cuda", "layout")
_UNKNOWN = object()  # a value the concrete tracer could not compute
HOOK_SLOTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")  # of a module
_CALLS_KEY = "fxstream_module_calls"  # GraphModule.meta key of the recorded ModuleCalls
_LITERALS = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


@dataclass(frozen=True)
class NodeName:
    """A traced node, by name: plain data standing for an ``fx.Node`` in a recorded value."""

    name: str


@dataclass(frozen=True)
class ModuleCall:
    """One call of a registered module while tracing (plain data): a leaf's ``call_module``
    node, or the nodes of a module traced through.

    ``args``, ``kwargs`` and ``output`` are the call's values with every node replaced by a
    :class:`NodeName` (tuples, lists, dicts and literals kept); ``recorded`` is False, and they
    are empty, when a value has no such form (a tensor constant, an arbitrary object).
    ``nodes`` names the nodes created during the call, in graph order; ``depth`` is the number
    of calls around it (0 for a call made by the root's ``forward``)."""

    path: str
    depth: int
    nodes: tuple[str, ...]
    recorded: bool
    args: tuple = ()
    kwargs: dict | None = None
    output: Any = None


class _NoGraphForm(Exception):
    """A value in a module call that has no plain-data form."""


def _plain(value: Any) -> Any:
    """``value`` with proxies replaced by :class:`NodeName` (raises :class:`_NoGraphForm`)."""
    if isinstance(value, fx.proxy.Attribute) and value.__dict__.get("_node") is None:
        raise _NoGraphForm("attribute")  # naming it would add a node to the graph
    if isinstance(value, fx.Proxy):
        return NodeName(value.node.name)
    if type(value) in (tuple, list):
        return type(value)(_plain(v) for v in value)
    if type(value) is dict:
        return {k: _plain(v) for k, v in value.items()}
    if type(value) is slice:
        return slice(_plain(value.start), _plain(value.stop), _plain(value.step))
    if isinstance(value, _LITERALS) or value is Ellipsis:
        return value
    raise _NoGraphForm(type(value).__name__)


class StreamTracer(fx.Tracer):
    """The default FX tracer, recording stack traces and module paths."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.proxy_buffer_attributes = True  # in-place ops on buffers become nodes, checked later
        self.module_calls: list[ModuleCall] = []  # every call of a registered module, innermost first
        self._depth = 0

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        # Leaf only when the class itself lives in torch.nn: a user subclass of
        # nn.Conv2d is traced through, whatever forward it defines.
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, torch.nn.Sequential)

    def call_module(self, m: torch.nn.Module, forward, args: tuple, kwargs: dict) -> Any:
        try:
            self.path_of_module(m)
        except NameError:  # called but not registered (e.g. kept in a plain list): trace through it
            return forward(*args, **kwargs)
        return self._recorded_call(m, self.path_of_module(m), args, kwargs)

    def _recorded_call(self, m: torch.nn.Module, path: str, args: tuple, kwargs: dict) -> Any:
        """Trace the call of ``m`` and record it (:class:`ModuleCall`). A leaf becomes one
        ``call_module`` node; any other module is traced through its ``forward``."""
        try:
            inputs = (_plain(args), _plain(kwargs))
        except _NoGraphForm:
            inputs = None
        before = len(self.graph.nodes)  # the tracer only appends nodes
        self._depth += 1
        try:  # m.forward, not m(...): its hooks stay out of the graph (fxstream.hooks fires them)
            output = super().call_module(m, m.forward, args, kwargs)
        finally:
            self._depth -= 1
        created = [n.name for n in islice(reversed(self.graph.nodes), len(self.graph.nodes) - before)][::-1]
        try:
            value = _plain(output)
        except _NoGraphForm:
            inputs = None
        if inputs is None:
            self.module_calls.append(ModuleCall(path, self._depth, tuple(created), False))
        else:
            self.module_calls.append(ModuleCall(path, self._depth, tuple(created), True, *inputs, value))
        return output

    def tensor_like(self, proxy: fx.Proxy) -> bool:
        """Whether ``proxy`` stands for a tensor (unknown to the plain tracer: assumed)."""
        return True


class ConcreteProxy(fx.Proxy):
    """A proxy that can answer ``len``/``int`` from its concrete value (see ConcreteTracer)."""

    def __len__(self) -> int:
        return len(self.tracer.static_value(self, "len()"))

    def __index__(self) -> int:
        answer = operator.index(self.tracer.static_value(self, "an int"))
        self.tracer._guard(self, answer)
        return answer

    def __int__(self) -> int:
        answer = int(self.tracer.static_value(self, "an int"))
        self.tracer._guard(self, answer)
        return answer

    def __getattr__(self, k: str) -> fx.Proxy:
        return ConcreteAttribute(self, k)  # x.shape, x.size: concrete proxies too


class ConcreteAttribute(fx.proxy.Attribute, ConcreteProxy):
    """``proxy.attr``, answering ``len``/``int`` like :class:`ConcreteProxy`."""


class ConcreteTracer(StreamTracer):
    """Symbolic tracing with a concrete value per node, computed on ``sample``."""

    def __init__(self, sample: torch.Tensor) -> None:
        super().__init__()
        self.sample = sample
        self.values: dict[fx.Node, Any] = {}
        self.static: set[fx.Node] = set()  # nodes computed from sizes and constants only
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ConcreteProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self._evaluate(proxy.node)
        return proxy

    def _evaluate(self, node: fx.Node) -> None:
        if node in self.values:
            return
        lookup = lambda n: self.values.get(n, _UNKNOWN)
        args = fx.node.map_arg(node.args, lookup)
        kwargs = fx.node.map_arg(node.kwargs, lookup)
        value = _UNKNOWN
        with _maybe_revert_all_patches(), torch.no_grad():
            try:
                value = self._run(node, args, kwargs)
            except Exception:  # unknown: Python may not ask for it; if it does, say so then
                value = _UNKNOWN
        self.values[node] = value
        if _is_static(node, value, self.static):
            self.static.add(node)

    def _run(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        if _UNKNOWN in args or _UNKNOWN in kwargs.values():
            return _UNKNOWN
        if node.op == "placeholder":
            self._placeholders += 1
            return self.sample if self._placeholders == 1 else (args[0] if args else _UNKNOWN)
        meta = self.sample.device.type == "meta"  # a sample of any size, without memory: parameters on meta too
        if meta:
            args, kwargs = fx.node.map_aggregate((args, kwargs), to_meta)
        if node.op == "get_attr":
            value = _fetch(self.root, str(node.target))
            return to_meta(value) if meta else value
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        if node.op == "call_module":
            module = self.root.get_submodule(str(node.target))
            return meta_call(module, args, kwargs) if meta else module(*args, **kwargs)
        return _UNKNOWN

    def static_value(self, proxy: fx.Proxy, need: str) -> Any:
        """The sample's value of ``proxy`` where Python needs ``need``; refused for values that
        depend on tensor data (they would differ between inputs)."""
        node = proxy.node
        value = self.values.get(node, _UNKNOWN)
        if node not in self.static or value is _UNKNOWN:
            raise TraceError(
                f"Python needs {need} of '{node.name}' ({node.format_node()}), which depends on tensor values, "
                f"not only on sizes.\n  at {_caller()}\n  fix: compute the branch with tensor ops (torch.where), "
                "or move it out of the streamed part of forward()"
            )
        return value

    def to_bool(self, obj: fx.Proxy) -> bool:
        answer = bool(self.static_value(obj, "a bool (an if or while condition)"))
        self._guard(obj, answer)
        return answer

    def _guard(self, obj: fx.Proxy, answer: Any) -> None:
        """Record the answer in the graph, as ``size_guard(value, answer, where)``: the planner
        re-evaluates it for every input size and refuses sizes that would branch differently."""

        self.create_proxy("call_function", size_guard, (obj, answer, _caller()), {})

    def iter(self, obj: fx.Proxy) -> Iterator:
        value = self.values.get(obj.node, _UNKNOWN)
        if value is _UNKNOWN:
            return super().iter(obj)
        return iter([obj[i] for i in range(len(value))])

    def tensor_like(self, proxy: fx.Proxy) -> bool:
        value = self.values.get(proxy.node, _UNKNOWN)
        return value is _UNKNOWN or isinstance(value, torch.Tensor)


def _is_static(node: fx.Node, value: Any, static: set) -> bool:
    if value is _UNKNOWN or node.op in ("placeholder", "get_attr", "call_module"):
        return False
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    if node.op == "call_function" and node.target is builtins.getattr and node.args[1] in _METADATA_ATTRIBUTES:
        return True
    return not isinstance(value, torch.Tensor) and all(n in static for n in node.all_input_nodes)


def _fetch(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def _caller() -> str:
    """The innermost stack frame outside torch and fxstream, as 'file:line: code'."""
    for frame in reversed(traceback.extract_stack()):
        if not is_internal_file(frame.filename):
            return f"{frame.filename}:{frame.lineno}: {(frame.line or '').strip()}"
    return "<unknown>"


@contextlib.contextmanager
def _jit_isinstance_as_isinstance(tracer: StreamTracer) -> Iterator[None]:
    """While tracing, ``torch.jit.isinstance(proxy, torch.Tensor)`` answers for the traced value."""
    original = torch.jit.isinstance

    def patched(obj: Any, target_type: Any) -> bool:
        if isinstance(obj, fx.Proxy):
            return isinstance(target_type, type) and issubclass(torch.Tensor, target_type) and tracer.tensor_like(obj)
        return original(obj, target_type)

    torch.jit.isinstance = patched
    try:
        yield
    finally:
        torch.jit.isinstance = original


# Factories whose sizes torch's argument parser reads before any __torch_function__ override:
# ``torch.zeros(x.size(0), c, *x.shape[2:])`` fails on a proxy (MONAI ResNet's shortcut), and
# ``torch.as_tensor(proxy)`` reads it as an array (MONAI HighResNet).
_FACTORIES = ("zeros", "ones", "empty", "full", "arange", "as_tensor")


@contextlib.contextmanager
def _factories_as_nodes() -> Iterator[None]:
    """While tracing, a torch factory called with a traced value becomes one graph node."""
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def wrap(name: str, original: Any) -> Any:
        def traced(*args: Any, **kwargs: Any) -> Any:
            proxies = []
            fx.node.map_aggregate((args, kwargs), lambda a: proxies.append(a) if isinstance(a, fx.Proxy) else None)
            if not proxies:
                return original(*args, **kwargs)
            return proxies[0].tracer.create_proxy("call_function", original, args, kwargs)

        traced.__name__ = name
        return traced

    for name, original in originals.items():
        setattr(torch, name, wrap(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch, name, original)


def run_tracer(tracer: StreamTracer, model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` with ``tracer``; raises what the tracer raises."""
    with _jit_isinstance_as_isinstance(tracer), _factories_as_nodes(), record_mutations(model, tracer):
        graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta[_CALLS_KEY] = tuple(tracer.module_calls)
    return gm


def module_calls(gm: fx.GraphModule) -> tuple[ModuleCall, ...] | None:
    """The module calls recorded when ``gm`` was traced (innermost first), or None for a
    GraphModule that :func:`run_tracer` did not make."""
    return gm.meta.get(_CALLS_KEY)


def trace(model: torch.nn.Module, sample: torch.Tensor | None = None) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its submodules and parameters, and check
    it against the eager model on a probe input (:func:`fxstream.frontend.tracecheck.check_trace`).

    ``sample`` is the input the concrete tracer runs on when Python control flow needs sizes
    (default: :func:`fxstream.frontend.tracecheck.probe_input`)."""
    try:
        gm = run_tracer(StreamTracer(), model)
    except FxStreamError:
        raise
    except Exception as plain:  # torch.fx raises many types; retry with concrete sizes
        sample = sample if sample is not None else probe_input(model)
        if sample is None:
            raise _trace_error(model, plain, "") from plain
        try:
            # the concrete tracer runs the model's modules on the sample: in training mode that
            # would update BatchNorm's running statistics and draw from the global generator
            with side_effects_undone(model, sample.device):
                gm = run_tracer(ConcreteTracer(sample), model)
        except TraceError as exc:  # control flow on tensor values
            raise TraceError(f"torch.fx could not trace {type(model).__name__}: {exc}") from exc
        except FxStreamError:
            raise
        except Exception as exc:
            raise _trace_error(model, exc, f" (also with concrete sizes from a {tuple(sample.shape)} sample)") from exc
    with hooks_suspended(model):  # the graph has none of them (and the probe is not the user's call)
        expected = check_trace(model, gm, sample)
    if type(expected) is collections.OrderedDict:  # torch.fx returns a plain dict: codegen restores it
        gm.meta["fxstream_output_type"] = collections.OrderedDict
    return gm


@contextlib.contextmanager
def hooks_suspended(model: torch.nn.Module) -> Iterator[None]:
    """For the duration, no module of ``model`` has hooks."""
    saved = [(m, slot, m.__dict__[slot]) for m in model.modules() for slot in HOOK_SLOTS]
    for module, slot, hooks in saved:
        module.__dict__[slot] = type(hooks)()
    try:
        yield
    finally:
        for module, slot, hooks in saved:
            module.__dict__[slot] = hooks


def _trace_error(model: torch.nn.Module, exc: Exception, detail: str) -> TraceError:
    return TraceError(
        f"torch.fx could not trace {type(model).__name__}{detail}: {exc}\n"
        "fxstream needs a model that torch.fx can trace once Python's questions about sizes are answered. "
        "Move control flow on tensor values out of forward(), or wrap the offending helper with torch.fx.wrap."
    )
