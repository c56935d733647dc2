"""The hook rule of a compiled module.

The trunk runs tile by tile: its modules are never called on the whole image (most of
them are not called at all: convolutions become functional calls in the tile code).
So module hooks follow one rule:

* hooks on the **trunk-output modules** (modules called once whose computation is all
  streamed and ends at the trunk output, e.g. ``layer4`` of a ResNet, or ``features``
  of a VGG) fire once per call, around the streamed trunk, with the assembled output
  and its gradient (what Grad-CAM on the last convolution needs). When such a module's
  input is the image, its hooks also get the input (and forward-pre hooks may replace
  it); otherwise its input never exists whole: forward hooks get ``input=()``, full
  backward hooks get ``grad_input=()``, and forward-pre hooks are rejected.
  A trunk with several outputs (e.g. ``layer1`` and ``layer4``) has one such module
  chain per output, which fires with that output. There, where later trunk ops read an
  output (``layer2`` reads ``layer1``), its modules' forward hooks may observe it but not
  replace it (:class:`ContractError`), and backward hooks are rejected (the gradient
  that flows inside the trunk never exists whole); forward-pre and backward hooks on a
  module whose input is the image are rejected too;
* hooks on any module of the **head** fire once, as on the plain model. ``torch.nn``
  modules are called by the head as they are. A module that torch.fx traces through
  (an ``nn.Sequential``, a user class, timm's ``ClassifierHead``), or an in-place
  ``torch.nn`` module rewritten out of place, has no call of its own in the traced
  graph: while it has hooks, :func:`collapse_hooked_calls` replaces the nodes of its
  call by one call of the module on the recorded arguments
  (:class:`fxstream.frontend.trace.ModuleCall`), so PyTorch fires its hooks with its real
  inputs and outputs. This needs a *clean* call (:class:`HeadCall`): the module is
  called once, its arguments are computed in the head (or are trunk outputs), its
  nodes read only its arguments and parameters, and nothing outside the call reads its
  nodes but its output. :func:`stale` tells when the hooks ask for another set of such
  calls (a hook registered or removed since the outer program was built);
* hooks on any other module that computes part of the trunk, on traced-through head
  modules whose call is not clean (unless an enclosing hooked module is called for
  real), on the original model object (call the compiled module: register them there),
  and global module hooks raise :class:`UnsupportedOpError` when the module is compiled
  or on the next call.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.modules.module as module_globals
from torch.utils.hooks import BackwardHook

from .analysis.analyze import Analysis, head_nodes
from .errors import ContractError, UnsupportedOpError, user_error
from .frontend.trace import HOOK_SLOTS, ModuleCall, NodeName, module_calls
from .runtime.live import fetch

_GLOBAL = (
    "_global_forward_pre_hooks",
    "_global_forward_hooks",
    "_global_backward_pre_hooks",
    "_global_backward_hooks",
)


@dataclass(frozen=True)
class OutputModule:
    """A trunk-output module: its path, whether its input is the image, which trunk output
    it ends at (an index into ``Analysis.outputs``), whether the trunk has several outputs,
    and whether later trunk ops read its output."""

    path: str
    takes_input: bool
    index: int = 0
    several: bool = False
    consumed: bool = False


@dataclass(frozen=True)
class HeadCall:
    """How the outer program calls a traced-through head module for real (plain data).

    ``args``/``kwargs`` are the recorded arguments (nodes as :class:`~fxstream.frontend.trace.NodeName`).
    ``inputs`` says where each argument node is in the outer graph, as ``(name, reader,
    index)``: input ``index`` of ``reader``, a node of the call (the trunk output is renamed
    there), or, with ``reader=''``, the node of that name. ``outputs`` is ``(keys, name)`` for
    every node of the module's output that the head reads (``keys`` index into the output).
    ``nodes`` are the call's nodes in graph order; ``depth`` is its nesting depth."""

    args: tuple
    kwargs: dict
    inputs: tuple[tuple[str, str, int], ...]
    outputs: tuple[tuple[tuple, str], ...]
    nodes: tuple[str, ...]
    depth: int


@dataclass(frozen=True)
class HeadModule:
    """A head module whose call is not in the traced graph, only its nodes: one that torch.fx
    traces through, or an in-place torch.nn module rewritten out of place (fxstream.frontend.functionalize)."""

    path: str
    node: str  # its first node (for errors)
    nodes: frozenset[str]  # its nodes, over all its calls
    call: HeadCall | None  # how to call it for real; None when its call is not clean
    problem: str = ""  # why it is not clean (with call None)


@dataclass(frozen=True)
class HookRule:
    """Where hooks may sit, for one compiled program (plain data)."""

    outputs: tuple[OutputModule, ...]  # outermost first
    inside: tuple[tuple[str, str], ...]  # (module path, first node name): hooks rejected
    traced_head: tuple[HeadModule, ...]  # head modules without a call: called for real while hooked, or rejected
    decomposed: tuple[tuple[str, str, str], ...] = ()  # norms streamed as statistics: (path, op, node): rejected


def hook_rule(analysis: Analysis) -> HookRule:
    """Classify every module of the traced model for the hook rule."""
    trunk = set(analysis.trunk)
    outs = list(analysis.outputs)
    nodes: dict[str, list[fx.Node]] = {}
    repeated: set[str] = set()
    leaves: set[str] = set()
    for node in analysis.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            path = str(value[0]) if isinstance(value, tuple) else str(key)
            nodes.setdefault(path, []).append(node)
            if "@" in str(key):
                repeated.add(path)
        if node.op == "call_module":
            leaves.add(str(node.target))
            if node not in nodes.setdefault(str(node.target), []):
                nodes[str(node.target)].append(node)
    outputs, inside, traced_head = [], [], []
    sites = _CallSites(analysis)
    for path, members in nodes.items():
        if not path:
            continue
        streamed = [n for n in members if n in trunk]
        if not streamed:
            if path not in leaves:
                traced_head.append(sites.head_module(path, members))
        elif (
            path not in repeated
            and len(streamed) == len(members)
            and members[-1] in outs
            and sum(n in outs for n in members) == 1  # a module ending at one output, not at several
        ):
            end = members[-1]
            consumed = any(u in trunk for u in end.users)
            several = len(outs) > 1
            outputs.append(OutputModule(path, _reads_only_image(members, analysis), outs.index(end), several, consumed))
        else:
            inside.append((path, streamed[0].name))
    outputs.sort(key=lambda m: m.path.count("."))
    decomposed = tuple(d for d in analysis.decomposed if d[0] in nodes)  # module paths (not functional norms)
    return HookRule(tuple(outputs), tuple(inside), tuple(traced_head), decomposed)


def _reads_only_image(members: list[fx.Node], analysis: Analysis) -> bool:
    own = set(members)
    trunk = set(analysis.trunk) | {analysis.image}
    external = {i for n in members for i in n.all_input_nodes if i not in own and i in trunk}
    return external == {analysis.image}


class _Unclean(Exception):
    """Why a traced-through call cannot be replaced by a call of its module."""


class _CallSites:
    """The recorded module calls (:func:`fxstream.frontend.trace.module_calls`), checked against the
    analysed graph: which head modules without a call of their own can be called for real."""

    def __init__(self, analysis: Analysis):
        self.calls: dict[str, list[ModuleCall]] = {}
        for call in module_calls(analysis.gm) or ():
            self.calls.setdefault(call.path, []).append(call)
        self.by_name = {n.name: n for n in analysis.gm.graph.nodes}
        self.head = head_nodes(analysis)  # the nodes the outer graph copies, by name
        self.live = self.head | set(analysis.trunk) | set(analysis.constants)

    def head_module(self, path: str, members: list[fx.Node]) -> HeadModule:
        names = frozenset(n.name for n in members)
        try:
            return HeadModule(path, members[0].name, names, self._call(path))
        except _Unclean as why:
            return HeadModule(path, members[0].name, names, None, str(why))

    def _call(self, path: str) -> HeadCall:
        calls = self.calls.get(path, [])
        if not calls:
            raise _Unclean("its call was not recorded when the model was traced")
        if len(calls) > 1:
            raise _Unclean(f"it is called {len(calls)} times")
        call = calls[0]
        if not call.recorded:
            raise _Unclean("its arguments or output hold values that are neither traced values nor literals")
        nodes = [self.by_name[n] for n in call.nodes if n in self.by_name]  # the analysis may erase some
        outputs = self._outputs(call, set(nodes))
        arguments = dict.fromkeys(v.name for v in _leaves((call.args, call.kwargs)))
        self._check_uses(nodes, {name for _, name in outputs})
        self._check_reads(nodes, set(arguments))
        inputs = tuple(self._locate(name, nodes) for name in arguments)
        return HeadCall(call.args, call.kwargs, inputs, outputs, tuple(n.name for n in nodes), call.depth)

    def _outputs(self, call: ModuleCall, own: set) -> tuple[tuple[tuple, str], ...]:
        outputs, seen = [], set()
        for keys, name in _keyed_leaves(call.output, ()):
            node = self.by_name.get(name)
            if node not in own:
                raise _Unclean(f"it returns '{name}', which it does not compute")
            if name in seen:
                raise _Unclean(f"it returns '{name}' twice")
            seen.add(name)
            if node in self.head:
                outputs.append((keys, name))
        if not outputs:
            raise _Unclean("the model's output does not depend on its output")
        return tuple(outputs)

    def _check_uses(self, nodes: list[fx.Node], outputs: set[str]) -> None:
        own = set(nodes)
        for node in nodes:
            if node.op == "get_attr" or node.name in outputs:
                continue
            for user in node.users:
                if user not in own and user in self.live:
                    raise _Unclean(f"'{user.name}', outside it, reads '{node.name}', a value computed inside it")

    def _check_reads(self, nodes: list[fx.Node], arguments: set[str]) -> None:
        own = set(nodes)
        for node in nodes:
            if node not in self.head:
                continue
            for read in node.all_input_nodes:
                if read not in own and read.name not in arguments and read.op != "get_attr":
                    raise _Unclean(f"its node '{node.name}' reads '{read.name}', which is not one of its arguments")

    def _locate(self, name: str, nodes: list[fx.Node]) -> tuple[str, str, int]:
        argument = self.by_name.get(name)
        if argument is None:
            raise _Unclean(f"its argument '{name}' was rewritten by the analysis")
        for node in nodes:
            if node in self.head and argument in node.all_input_nodes:
                return name, node.name, node.all_input_nodes.index(argument)
        if argument in self.head:
            return name, "", -1
        raise _Unclean(f"its argument '{name}' is not computed in the head")


def _leaves(value: Any) -> list[NodeName]:
    return [leaf for _, leaf in _keyed_leaves(value, (), named=False)]


def _keyed_leaves(value: Any, keys: tuple, named: bool = True) -> list:
    """``(keys, node name)`` (or ``(keys, NodeName)``) of every node in a recorded value."""
    if isinstance(value, NodeName):
        return [(keys, value.name if named else value)]
    if isinstance(value, (tuple, list)):
        items = enumerate(value)
    elif isinstance(value, dict):
        items = value.items()
    elif isinstance(value, slice):
        items = enumerate((value.start, value.stop, value.step))
    else:
        return []
    return [leaf for key, item in items for leaf in _keyed_leaves(item, keys + (key,), named)]


def check(rule: HookRule, root: nn.Module, source: nn.Module) -> None:
    """Raise :class:`UnsupportedOpError` for every hook the rule does not allow."""
    for name in _GLOBAL:
        if getattr(module_globals, name, None):
            raise user_error(
                UnsupportedOpError,
                f"cannot stream with a global module hook (torch.nn.modules.module.{name}): it would fire on "
                "every tile instead of on the whole image",
                op="global module hook",
                fix="remove the global hook, or register the hook on a head module or the compiled module",
            )
    if _hooks(source):
        raise user_error(
            UnsupportedOpError,
            f"a hook is registered on the original {type(source).__name__} object, which the compiled module "
            "never calls",
            op="module hook",
            fix="register the hook on the compiled module returned by fxstream.compile",
        )
    for path, op, node in rule.decomposed:
        if _hooks(fetch(root, path)):
            raise user_error(
                UnsupportedOpError,
                f"cannot stream the hooks of module '{path}': this {op} is streamed as global statistics (a sum over "
                "the whole image, streamed in its own passes, then a pixelwise normalisation in every tile), so the "
                "module is never called and its hooks would never fire",
                node=node,
                module_path=path,
                op="module hook",
                fix=f"pass boundary=... ending before '{path}' so that it runs on the whole feature map, or move the "
                "hook to a module of the head (see docs/contract.md)",
            )
    for path, node in rule.inside:
        if _hooks(fetch(root, path)):
            raise user_error(
                UnsupportedOpError,
                f"cannot stream the hooks of module '{path}': it computes part of the streamed trunk, which "
                "runs tile by tile, so its hooks would see tiles or never fire",
                node=node,
                module_path=path,
                op="module hook",
                fix=f"pass boundary=... ending before '{path}' so that it runs on the whole feature map, or "
                "move the hook to the trunk-output module or a head module (see docs/contract.md)",
            )
    covered = set().union(*(head.call.nodes for head in _collapsing(rule, root)))
    for head in rule.traced_head:
        if head.call is None and not head.nodes <= covered and _hooks(fetch(root, head.path)):
            raise user_error(
                UnsupportedOpError,
                f"cannot fire the hooks of module '{head.path}': the compiled head has its nodes but no call of it "
                "(it is traced through, or an in-place module rewritten out of place), and it cannot be called as a "
                f"whole because {head.problem}",
                node=head.node,
                module_path=head.path,
                op="module hook",
                fix=f"register the hook on a torch.nn submodule of '{head.path}', on a module that calls it once "
                "and returns what it computes, or on the compiled module",
            )
    for out in rule.outputs:
        _check_output(fetch(root, out.path), out)


def _collapsing(rule: HookRule, root: nn.Module) -> list[HeadModule]:
    """The hooked traced-through head modules to call for real: clean calls, outermost only."""
    hooked = [h for h in rule.traced_head if h.call is not None and _hooks(fetch(root, h.path))]
    return [h for h in hooked if not any(_within(h.call, g.call) for g in hooked if g is not h)]


def _within(inner: HeadCall, outer: HeadCall) -> bool:
    """Whether ``inner`` is a call made during ``outer`` (calling ``outer`` for real makes it too)."""
    return outer.depth < inner.depth and set(inner.nodes) <= set(outer.nodes)


def stale(gm: fx.GraphModule, rule: HookRule, root: nn.Module) -> bool:
    """Whether the outer GraphModule ``gm`` calls other head modules for real than the hooks
    registered now ask for (:func:`collapse_hooked_calls` must then run again)."""
    paths = {head.path for head in rule.traced_head}
    built = {n.target for n in gm.graph.nodes if n.op == "call_module" and n.target in paths}
    return built != {head.path for head in _collapsing(rule, root)}


def collapse_hooked_calls(graph: fx.Graph, rule: HookRule, root: nn.Module) -> fx.Graph:
    """``graph`` (the outer graph) with the nodes of every hooked, clean traced-through head
    module's call replaced by one ``call_module`` of it, so that PyTorch fires its hooks; a new
    graph, or ``graph`` itself when no such module has hooks."""
    heads = _collapsing(rule, root)
    if not heads:
        return graph
    new = fx.Graph()
    new.output(new.graph_copy(graph, {}))
    replaced: dict[str, fx.Node] = {}
    for head in heads:
        _collapse(new, head, replaced)
    new.lint()
    return new


def _collapse(graph: fx.Graph, head: HeadModule, replaced: dict[str, fx.Node]) -> None:
    """Replace the call's nodes by ``call_module(head.path)``; ``replaced`` maps the names of
    replaced output nodes (of earlier calls) to their new nodes."""
    by_name = {**{n.name: n for n in graph.nodes}, **replaced}
    call = head.call
    nodes = [by_name[name] for name in call.nodes if name in by_name]
    own = set(nodes)
    found = {
        name: by_name[reader].all_input_nodes[index] if reader else by_name[name] for name, reader, index in call.inputs
    }
    with graph.inserting_before(nodes[0]):
        value = graph.call_module(head.path, _bind(call.args, found), _bind(call.kwargs, found))
        for keys, name in call.outputs:
            item = value
            for key in keys:
                item = graph.call_function(operator.getitem, (item, key))
            by_name[name].replace_all_uses_with(item, delete_user_cb=lambda user: user not in own)
            replaced[name] = item
    for node in reversed(nodes):
        if not node.users:
            graph.erase_node(node)


def _bind(value: Any, found: dict[str, fx.Node]) -> Any:
    """A recorded value with each :class:`NodeName` replaced by its node in ``found``."""
    if isinstance(value, NodeName):
        return found[value.name]
    if isinstance(value, (tuple, list)):
        return type(value)(_bind(v, found) for v in value)
    if isinstance(value, dict):
        return {k: _bind(v, found) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_bind(value.start, found), _bind(value.stop, found), _bind(value.step, found))
    return value


def _check_output(module: nn.Module, out: OutputModule) -> None:
    problem = ""
    backward = bool(module._backward_hooks or module._backward_pre_hooks)
    if module._backward_hooks and module._is_full_backward_hook is not True:
        problem, fix = "an old-style backward hook", "use register_full_backward_hook"
    elif module._forward_pre_hooks and (not out.takes_input or out.several):
        problem = "a forward-pre hook, but its input is inside the trunk and never exists whole"
        if out.several:
            problem = "a forward-pre hook, and the trunk has several outputs computed together"
        fix = f"pass boundary=... ending before '{out.path}' so that it runs on the whole feature map"
    elif backward and out.consumed:
        problem = (
            "a backward hook, but later trunk ops read its output, so the gradient it would see is computed "
            "tile by tile and never exists whole"
        )
        fix = f"pass boundary=... ending at '{out.path}' so that its readers run on the whole feature map"
    elif backward and out.several and out.takes_input:
        problem = "a backward hook, and its input (the image) feeds several trunk outputs computed together"
        fix = "move the hook to a module that does not read the image, or to the head"
    if problem:
        raise user_error(
            UnsupportedOpError,
            f"cannot stream the hooks of module '{out.path}' (the trunk output): it has {problem}",
            module_path=out.path,
            op="module hook",
            fix=fix,
        )


def _hooks(module: nn.Module) -> bool:
    return any(getattr(module, slot, None) for slot in HOOK_SLOTS)


def around(forward: Callable, root: nn.Module, rule: HookRule) -> Callable:
    """``forward`` (the streamed trunk's) wrapped to fire the trunk-output modules' hooks."""
    if any(out.several for out in rule.outputs):
        return _around_several(forward, root, rule)
    paths = [(out.path, out.takes_input) for out in rule.outputs]

    def hooked(x):
        layers = [(fetch(root, path), takes_input) for path, takes_input in paths]
        layers = [(m, takes_input) for m, takes_input in layers if _hooks(m)]
        return _call(layers, forward, x) if layers else forward(x)

    return hooked


def _around_several(forward: Callable, root: nn.Module, rule: HookRule) -> Callable:
    """A trunk with several outputs: each output's modules fire (innermost first, outputs in
    topological order, as on the plain model) with that output. :func:`check` has rejected
    forward-pre hooks, and backward hooks where the gradient never exists whole."""
    chains = sorted(rule.outputs, key=lambda out: (out.index, -out.path.count(".")))

    def hooked(x):
        layers = [(fetch(root, out.path), out) for out in chains]
        layers = [(m, out) for m, out in layers if _hooks(m)]
        outs = forward(x)
        if not layers:
            return outs
        outs = list(outs)
        for module, out in layers:
            value = outs[out.index]
            for key, hook in list(module._forward_hooks.items()):
                kwargs = ({},) if key in module._forward_hooks_with_kwargs else ()
                result = hook(module, (), *kwargs, value)
                if result is not None and out.consumed:
                    raise user_error(
                        ContractError,
                        f"a forward hook of module '{out.path}' returned a new output, but later trunk ops read "
                        "its output and were computed from the original one tile by tile",
                        module_path=out.path,
                        fix=f"pass boundary=... ending at '{out.path}' so that its readers run on the whole "
                        "feature map, or return None from the hook",
                    )
                value = value if result is None else result
            full, _ = module._get_backward_hooks()
            pre = list(module._backward_pre_hooks.values())
            if (full or pre) and value.requires_grad:
                value.register_hook(_output_grad_hook(module, full, pre))
            outs[out.index] = value
        return tuple(outs)

    return hooked


def _call(layers: list, forward: Callable, x):
    """What ``nn.Module.__call__`` does with hooks, for the outermost of ``layers``."""
    if not layers:
        return forward(x)
    module, takes_input = layers[0]
    args = (x,) if takes_input else ()
    for key, hook in list(module._forward_pre_hooks.items()):
        if key in module._forward_pre_hooks_with_kwargs:
            result = hook(module, args, {})
            args = result[0] if result is not None else args
        else:
            result = hook(module, args)
            args = args if result is None else (result if isinstance(result, tuple) else (result,))
    full, _ = module._get_backward_hooks()
    pre = list(module._backward_pre_hooks.values())
    grad_hook = BackwardHook(module, full, pre) if takes_input and (full or pre) and torch.is_grad_enabled() else None
    if grad_hook is not None:
        args = grad_hook.setup_input_hook(args)
    out = _call(layers[1:], forward, args[0] if args else x)
    for key, hook in list(module._forward_hooks.items()):
        kwargs = ({},) if key in module._forward_hooks_with_kwargs else ()
        result = hook(module, args, *kwargs, out)
        out = out if result is None else result
    if grad_hook is not None:
        return grad_hook.setup_output_hook(out)
    if (full or pre) and out.requires_grad:
        out.register_hook(_output_grad_hook(module, full, pre))
    return out


def _output_grad_hook(module: nn.Module, full: list, pre: list) -> Callable:
    """Backward hooks of a module whose input never exists whole: they get ``grad_input=()``."""

    def on_grad(grad):
        grads = (grad,)
        for hook in pre:
            result = hook(module, grads)
            grads = grads if result is None else tuple(result)
        for hook in full:
            hook(module, (), grads)
        return grads[0]

    return on_grad
