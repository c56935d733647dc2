"""Channel-only ops: splitting and regrouping the batch/channel dims of a spatial tensor.

Each output pixel of these ops holds a rearrangement of the same input pixel's channels,
so they are local. Two FX patterns need help before the op table can say so:

* ``torch.split``/``chunk``/``unbind``/``tensor_split`` return a tuple, read back with
  ``getitem``. :func:`fuse_pieces` rewrites each ``pieces[i]`` into one tensor op,
  ``piece(x, 'split', sizes, dim, i)``, so no tuple ever flows through the trunk::

      a, b = x.split([4, 4], dim=1)   ->   a = piece(x, 'split', [4, 4], 1, 0)
                                           b = piece(x, 'split', [4, 4], 1, 1)

* a view or reshape whose arguments repeat the spatial sizes (the ShuffleNet channel
  shuffle ``x.view(n, g, c // g, h, w)`` with ``n, c, h, w = x.size()``). In a tile, ``h``
  and ``w`` must be the tile's sizes, not the image's. :func:`channel_view` checks that the
  view only regroups non-spatial dims and gives ``regroup(x, (n, g, c // g, None, None), (2, 3))``:
  the spatial entries are read from the tile itself (``x.shape[2]``, ``x.shape[3]``).

A view is channel-only when every spatial dim of its input reappears, in the same order, as
an argument that reads that dim's size (``x.size(2)``, ``x.shape[2]``, ``x.size()[2]``) from a
tensor of the same spatial size, and all non-spatial dims sit in one group on both sides (so
the view cannot move elements between channels and pixels). Anything else, such as
``x.view(n, c, h // 2, 2, w)``, stays a use of spatial sizes and is rejected as before.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

_SPLIT_FUNCTIONS = {
    torch.split: "split",
    torch.chunk: "chunk",
    torch.unbind: "unbind",
    torch.tensor_split: "tensor_split",
}
_SPLIT_METHODS = {"split": "split", "split_with_sizes": "split", "chunk": "chunk", "unbind": "unbind"}
_SPLIT_METHODS["tensor_split"] = "tensor_split"
_VIEW_METHODS = ("view", "reshape")


def piece(x: torch.Tensor, kind: str, arg: Any, dim: int, index: int) -> torch.Tensor:
    """Piece ``index`` of ``torch.<kind>(x, arg, dim)`` (``torch.unbind(x, dim)`` for 'unbind')."""
    if kind == "unbind":
        return torch.unbind(x, dim)[index]
    return getattr(torch, kind)(x, arg, dim)[index]


def regroup(x: torch.Tensor, shape: tuple, dims: tuple[int, ...]) -> torch.Tensor:
    """``x.reshape(shape)`` with each ``None`` of ``shape`` replaced by ``x.shape[d]`` for the
    next ``d`` of ``dims`` (the spatial dims, in order)."""
    sizes = iter(x.shape[d] for d in dims)
    return x.reshape(tuple(next(sizes) if s is None else s for s in shape))


# --- split/chunk/unbind + getitem -> piece -------------------------------------------


def _split_form(node: fx.Node) -> tuple[str, fx.Node, Any, Any] | None:
    """(kind, input, sizes/chunks, dim) of a splitting node, or None."""
    if node.op == "call_function" and node.target in _SPLIT_FUNCTIONS:
        kind = _SPLIT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _SPLIT_METHODS:
        kind = _SPLIT_METHODS[node.target]
    else:
        return None
    args = list(node.args)
    x = args.pop(0) if args else node.kwargs.get("input", node.kwargs.get("self"))
    if kind == "unbind":
        return kind, x, None, args[0] if args else node.kwargs.get("dim", 0)
    names = ("split_size_or_sections", "split_size", "split_sizes", "chunks", "sections", "indices_or_sections")
    arg = args.pop(0) if args else next((node.kwargs[n] for n in names if n in node.kwargs), None)
    dim = args[0] if args else node.kwargs.get("dim", 0)
    return kind, x, arg, dim


def fuse_pieces(gm: fx.GraphModule) -> None:
    """Rewrite ``getitem(split(x, ...), i)`` into ``piece(x, 'split', ..., i)`` (see the module
    docstring). Splits whose result is used other than by integer indexing stay as they are."""
    for node in list(gm.graph.nodes):
        form = _split_form(node)
        if form is None or not isinstance(form[1], fx.Node) or not node.users:
            continue
        users = list(node.users)
        if not all(_int_index(u) for u in users):
            continue
        kind, x, arg, dim = form
        for user in users:
            if user.users:
                user.target, user.args, user.kwargs = piece, (x, kind, arg, dim, user.args[1]), {}
            else:  # an unused piece would count as a second use of x
                gm.graph.erase_node(user)
        gm.graph.erase_node(node)
    gm.recompile()


def _int_index(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], int)


def piece_layout(layout: tuple, kind: str, dim: int) -> tuple | None:
    """The layout of a piece, or None when ``dim`` is spatial."""
    dim %= len(layout)
    if layout[dim] is not None:
        return None
    if kind == "unbind":
        return layout[:dim] + layout[dim + 1 :]
    return layout


# --- view/reshape that regroups channels -> regroup ---------------------------------------


def is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.op == "call_function" and node.target is torch.reshape


def _view_args(node: fx.Node) -> tuple[fx.Node, list]:
    if node.op == "call_function":  # torch.reshape(x, shape)
        x = node.args[0]
        shape = node.args[1] if len(node.args) > 1 else node.kwargs["shape"]
        return x, list(shape)
    x, rest = node.args[0], list(node.args[1:])
    if not rest and "size" in node.kwargs:
        rest = [node.kwargs["size"]]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        rest = list(rest[0])
    return x, rest


def size_query(node: Any) -> tuple[fx.Node, int] | None:
    """``(t, d)`` when ``node`` is ``t.size(d)``, ``t.size()[d]`` or ``t.shape[d]`` with an int ``d``."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_method" and node.target == "size" and len(node.args) == 2:
        t, d = node.args
    elif node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        shape, d = node.args
        whole_size = shape.op == "call_method" and shape.target == "size" and len(shape.args) == 1
        attribute = shape.op == "call_function" and shape.target is getattr and shape.args[1] == "shape"
        if not (whole_size or attribute):
            return None
        t = shape.args[0]
    else:
        return None
    return (t, d) if isinstance(t, fx.Node) and isinstance(d, int) else None


def channel_view(node: fx.Node, layouts: dict, roots: dict, is_size) -> tuple | None:
    """``(x, shape, dims)`` for ``regroup`` when ``node`` is a channel-only view of ``x``, else None.

    ``roots`` maps spatial nodes to a representative of their spatial size (nodes related by
    local ops share it); ``is_size(arg)`` tells whether an argument depends on spatial sizes."""
    if not is_view(node):
        return None
    x, shape = _view_args(node)
    if x not in layouts:
        return None
    layout = layouts[x]
    spatial_dims = [d for d, axis in enumerate(layout) if axis is not None]
    out, found = [], []
    for arg in shape:
        query = size_query(arg)
        if query is not None and query[0] in layouts and roots.get(query[0]) is roots.get(x):
            t, d = query
            axis = layouts[t][d % len(layouts[t])]
            if axis is not None:
                found.append(axis)
                out.append(None)
                continue
        if is_size(arg) or (isinstance(arg, int) and arg < -1):
            return None  # a spatial size used as a channel count, or arithmetic on it
        out.append(arg)
    if found != [layout[d] for d in spatial_dims] or not _one_channel_group(layout, out):
        return None
    return x, tuple(out), tuple(spatial_dims)


def _one_channel_group(layout: tuple, shape: list) -> bool:
    """All non-spatial dims of the input, and of the output, form one run, at the same place
    relative to the spatial dims. Then the element count fixes the run's size on both sides."""
    runs = _runs(layout)
    return len(runs) == 1 and runs == _runs(tuple(None if s is not None else 0 for s in shape))


def _runs(layout: tuple) -> tuple[int, ...]:
    """Indices of the gaps (before, between, after the spatial dims) that hold non-spatial dims."""
    gap, runs = 0, []
    for axis in layout:
        if axis is None:
            if not runs or runs[-1] != gap:
                runs.append(gap)
        else:
            gap += 1
    return tuple(runs)
