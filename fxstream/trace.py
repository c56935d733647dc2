"""Stage 1, trace: ``nn.Module`` -> ``torch.fx.GraphModule``.

torch.nn modules stay leaves (``call_module`` nodes) so their runtime state,
such as ``training``, stays visible to the analysis. User modules, including
subclasses of ``nn.Conv2d`` that override ``forward``, are traced through, so
their own logic is never flattened into a plain op. Stack traces are recorded
so errors can point at the user's source line.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .errors import TraceError


class StreamTracer(fx.Tracer):
    """The default FX tracer, recording stack traces and module paths."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        # Leaf only when the class itself lives in torch.nn: a user subclass of
        # nn.Conv2d is traced through, whatever forward it defines.
        return type(m).__module__.startswith(("torch.nn", "torch.ao.nn")) and not isinstance(m, torch.nn.Sequential)


def trace(model: torch.nn.Module) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule that shares its submodules and parameters."""
    tracer = StreamTracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # torch.fx raises many types; wrap them once.
        raise TraceError(
            f"torch.fx could not trace {type(model).__name__}: {exc}\n"
            "fxstream needs a model that torch.fx.symbolic_trace accepts. Move data-dependent "
            "control flow out of forward(), or wrap the offending helper with torch.fx.wrap."
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


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
    user = [f for f in frames if not _is_torch_file(f[0])]
    if not user:
        return ""
    path, number, code = user[-1]
    return f"{path}:{number}: {code}"


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
