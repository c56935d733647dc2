"""Arguments computed from spatial sizes, evaluated per input size.

U-Nets fit decoder maps to their skips with code like ``F.pad(x1, [dx // 2, dx - dx // 2, ...])``
where ``dx = x2.size(3) - x1.size(3)``, or ``F.interpolate(x, size=skip.shape[2:])``. Such
arguments are the same for every tile of one image, but change with the image size. The
planner evaluates them for each input size: :func:`size_evaluator` turns a shape/size node
into a function of the spatial sizes computed so far, and :func:`window_resolver` turns a
dynamic trunk node into a function that returns its per-axis stencils.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.fx as fx

from ..errors import InputShapeError, describe
from . import table as ops


class SpatialStandIn:
    """What a spatial tensor looks like to size arithmetic: its shape, with ``None`` for
    the batch and channel dims (they are not known to the planner)."""

    def __init__(self, shape: tuple):
        self.shape = shape

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)


def _stand_in(layout: tuple, spatial: tuple) -> SpatialStandIn:
    return SpatialStandIn(tuple(None if axis is None else spatial[axis] for axis in layout))


def size_evaluator(node: fx.Node, layouts: dict) -> Callable[[dict, dict], Any]:
    """``evaluate(values, sizes)``: the node's value, given evaluated size nodes (by name)
    and the spatial sizes of spatial nodes (by name)."""

    def lookup(n: fx.Node, values: dict, sizes: dict) -> Any:
        if n.name in values:
            return values[n.name]
        if n in layouts and n.name in sizes:
            return _stand_in(layouts[n], sizes[n.name])
        raise InputShapeError(
            f"fxstream cannot evaluate '{node.name}' from spatial sizes: it reads '{n.name}', which is not a "
            "spatial size (sizes of batch and channel dims are not known to the planner)"
        )

    def evaluate(values: dict, sizes: dict) -> Any:
        args = fx.node.map_arg(node.args, lambda n: lookup(n, values, sizes))
        kwargs = fx.node.map_arg(node.kwargs, lambda n: lookup(n, values, sizes))
        try:
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return node.target(*args, **kwargs)
        except TypeError as exc:
            raise InputShapeError(
                f"fxstream cannot evaluate '{node.name}' from spatial sizes ({exc}); it may use the batch or "
                "channel size, which the planner does not know"
            ) from exc

    return evaluate


def window_resolver(node: fx.Node, module, layouts: dict, ndim: int) -> Callable[[dict, dict], tuple]:
    """``resolve(values, sizes)``: the per-axis stencils of a dynamic trunk node."""

    def resolve(values: dict, sizes: dict) -> tuple:
        by_node = {n: values[n.name] for n in node.all_input_nodes if n.name in values}
        spatial = {n: sizes[n.name] for n in node.all_input_nodes if n in layouts}
        ctx = ops.OpContext(node, module, layouts, ndim, values=by_node, sizes=spatial)
        verdict = ops.classify(ctx)
        if isinstance(verdict, ops.Rejected):
            raise InputShapeError(
                f"'{node.name}' cannot be streamed at this input size: {verdict.reason}.\n  {describe(node)}\n"
                f"  fix: {verdict.fix}"
            )
        return verdict.stencils

    return resolve
