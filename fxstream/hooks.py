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
  backward hooks get ``grad_input=()``, and forward-pre hooks are rejected;
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
from .errors import UnsupportedOpError, user_error
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
    """A trunk-output module: its path, and whether its input is the image."""

    path: str
    takes_input: bool


@dataclass(frozen=True)
class HookRule:
    """Where hooks may sit, for one compiled program (plain data)."""

    outputs: tuple[OutputModule, ...]  # outermost first
    inside: tuple[tuple[str, str], ...]  # (module path, first node name): hooks rejected
    traced_head: tuple[tuple[str, str], ...]  # head modules traced through: hooks never fire


def hook_rule(analysis: Analysis) -> HookRule:
    """Classify every module of the traced model for the hook rule."""
    trunk = set(analysis.trunk)
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
        elif path not in repeated and len(streamed) == len(members) and members[-1] is analysis.output:
            outputs.append(OutputModule(path, _reads_only_image(members, analysis)))
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
    if module._backward_hooks and module._is_full_backward_hook is not True:
        problem, fix = "an old-style backward hook", "use register_full_backward_hook"
    elif module._forward_pre_hooks and not out.takes_input:
        problem = "a forward-pre hook, but its input is inside the trunk and never exists whole"
        fix = f"pass boundary=... ending before '{out.path}' so that it runs on the whole feature map"
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
    paths = [(out.path, out.takes_input) for out in rule.outputs]

    def hooked(x):
        layers = [(fetch(root, path), takes_input) for path, takes_input in paths]
        layers = [(m, takes_input) for m, takes_input in layers if _hooks(m)]
        return _call(layers, forward, x) if layers else forward(x)

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
