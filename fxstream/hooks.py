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
* hooks on ``torch.nn`` modules of the **head** fire as usual: the head runs
  unchanged on the assembled feature map;
* hooks on any other module that computes part of the trunk, on head modules that
  are traced through (their hooks would never fire), on the original model object
  (call the compiled module: register them there), and global module hooks raise
  :class:`UnsupportedOpError` when the module is compiled or on the next call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.modules.module as module_globals
from torch.utils.hooks import BackwardHook

from .analyze import Analysis
from .errors import ContractError, UnsupportedOpError, user_error
from .live import fetch

_HOOK_SLOTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
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
class HookRule:
    """Where hooks may sit, for one compiled program (plain data)."""

    outputs: tuple[OutputModule, ...]  # outermost first
    inside: tuple[tuple[str, str], ...]  # (module path, first node name): hooks rejected
    traced_head: tuple[tuple[str, str], ...]  # head modules traced through: hooks never fire


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
    for path, members in nodes.items():
        if not path:
            continue
        streamed = [n for n in members if n in trunk]
        if not streamed:
            if path not in leaves:
                traced_head.append((path, members[0].name))
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
    return HookRule(tuple(outputs), tuple(inside), tuple(traced_head))


def _reads_only_image(members: list[fx.Node], analysis: Analysis) -> bool:
    own = set(members)
    trunk = set(analysis.trunk) | {analysis.image}
    external = {i for n in members for i in n.all_input_nodes if i not in own and i in trunk}
    return external == {analysis.image}


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
    for path, node in rule.traced_head:
        if _hooks(fetch(root, path)):
            raise user_error(
                UnsupportedOpError,
                f"the hooks of module '{path}' would never fire: it is traced through (not a torch.nn leaf), so "
                "the compiled head calls its submodules, not the module itself",
                node=node,
                module_path=path,
                op="module hook",
                fix=f"register the hook on a torch.nn submodule of '{path}', or on the compiled module",
            )
    for out in rule.outputs:
        _check_output(fetch(root, out.path), out)


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
    return any(getattr(module, slot, None) for slot in _HOOK_SLOTS)


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
