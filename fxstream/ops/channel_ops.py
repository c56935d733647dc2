"""Channel-only ops: splitting and regrouping the batch/channel dims of a spatial tensor.

Each output pixel of these ops holds a rearrangement of the same input pixel's channels,
so they are local. These FX patterns need help before the op table can say so:

* ``torch.split``/``chunk``/``unbind``/``tensor_split`` return a tuple, read back with
  ``getitem``. :func:`fuse_pieces` rewrites each ``pieces[i]`` into one tensor op,
  ``piece(x, 'split', sizes, dim, i)``, so no tuple ever flows through the trunk::

      a, b = x.split([4, 4], dim=1)   ->   a = piece(x, 'split', [4, 4], 1, 0)
                                           b = piece(x, 'split', [4, 4], 1, 1)

* space-to-depth written as ``x.view(N, C, H // b, b, W // b, b)``, a permute that keeps
  ``H // b, W // b`` last, and a view back to ``(N, C * b * b, H // b, W // b)`` (timm's
  TResNet). :func:`fuse_space_to_depth` rewrites the three nodes into one window op,
  ``space_to_depth(x, b, order)``: ``pixel_unshuffle`` with the channels in ``order``.

* a tensor made from the spatial sizes of a trunk tensor ``x`` (MONAI ResNet's shortcut,
  ``torch.zeros(out.size(0), c, *out.shape[2:])``): :func:`sized_factory` recognises it, and
  ``sized(x, shape, dims, factory, args, kwargs)`` makes it in a tile with the tile's sizes,
  read from ``x`` as ``regroup`` does below.

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


def space_to_depth(x: torch.Tensor, block: int, order: tuple[int, ...]) -> torch.Tensor:
    """``x`` of shape ``(N, C, *spatial)`` viewed as ``(N, C, s0 // b, b, s1 // b, b, ...)``,
    permuted by ``order`` (which keeps the ``s // b`` dims last, in order) and viewed as
    ``(N, -1, s0 // b, s1 // b, ...)``."""
    n, c, *spatial = x.shape
    split = [n, c] + [v for s in spatial for v in (s // block, block)]
    return x.reshape(split).permute(order).reshape(n, -1, *(s // block for s in spatial))


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


# --- view/permute/view that moves blocks of pixels into channels -> space_to_depth ------------


def fuse_space_to_depth(gm: fx.GraphModule) -> None:
    """Rewrite ``x.view(N, C, H // b, b, W // b, b).permute(order)[.contiguous()].view(N, -1,
    H // b, W // b)`` into ``space_to_depth(x, b, order)`` (see the module docstring). ``N``,
    ``C``, ``H`` and ``W`` must be read from ``x`` itself; anything else stays as it is."""
    for node in list(gm.graph.nodes):
        found = _space_to_depth(node)
        if found is None:
            continue
        x, block, order, chain = found
        last = chain[-1]
        last.op, last.target, last.args, last.kwargs = "call_function", space_to_depth, (x, block, order), {}
        for dead in reversed(chain[:-1]):
            gm.graph.erase_node(dead)
    gm.recompile()


def _space_to_depth(node: fx.Node) -> tuple | None:
    """``(x, b, order, [first view, permute, (contiguous), last view])`` or None."""
    if not is_view(node) or len(node.users) != 1:
        return None
    x, shape = _view_args(node)
    k = (len(shape) - 2) // 2
    if not isinstance(x, fx.Node) or k < 1 or len(shape) != 2 + 2 * k:
        return None
    block = shape[3]
    outer = shape[2::2]
    if not (_reads(shape[0], x, 0) and _reads(shape[1], x, 1) and type(block) is int and block > 1):
        return None
    if shape[3::2] != [block] * k or not all(_divides(o, x, 2 + j, block) for j, o in enumerate(outer)):
        return None
    permute = next(iter(node.users))
    order = _permute_order(permute, node)
    kept_last = order is not None and order[0] == 0 and order[-k:] == tuple(range(2, 2 + 2 * k, 2))
    if not kept_last or sorted(order[1:-k]) != [1] + list(range(3, 3 + 2 * k, 2)) or len(permute.users) != 1:
        return None
    chain = [node, permute]
    last = next(iter(permute.users))
    if last.op == "call_method" and last.target == "contiguous" and len(last.users) == 1:
        chain.append(last)
        last = next(iter(last.users))
    if not is_view(last) or _view_args(last)[0] is not chain[-1]:
        return None
    final = _view_args(last)[1]
    if len(final) != 2 + k or not _same(final[0], shape[0]) or not all(_same(a, b) for a, b in zip(final[2:], outer)):
        return None
    return x, block, order, chain + [last]


def _permute_order(node: fx.Node, source: fx.Node) -> tuple[int, ...] | None:
    """The dims of ``source.permute(dims)`` / ``torch.permute(source, dims)``, or None."""
    method = node.op == "call_method" and node.target == "permute"
    if not (method or node.op == "call_function" and node.target is torch.permute):
        return None
    if not node.args or node.args[0] is not source:
        return None
    dims = node.args[1:] or (node.kwargs.get("dims", ()),)
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return tuple(dims) if all(type(d) is int and d >= 0 for d in dims) else None


def _reads(arg: Any, x: fx.Node, dim: int) -> bool:
    return size_query(arg) == (x, dim)


def _divides(arg: Any, x: fx.Node, dim: int, block: int) -> bool:
    """``arg`` is ``x.size(dim) // block``."""
    return (
        isinstance(arg, fx.Node)
        and arg.op == "call_function"
        and arg.target is operator.floordiv
        and arg.args[1] == block
        and _reads(arg.args[0], x, dim)
    )


def _same(a: Any, b: Any) -> bool:
    """``a`` and ``b`` compute the same value: the same node or literal, the same size query,
    or the same function of such arguments."""
    if a is b or (not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b):
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return False
    if size_query(a) is not None:
        return size_query(a) == size_query(b)
    return (
        a.op == b.op == "call_function"
        and a.target is b.target
        and not a.kwargs
        and not b.kwargs
        and len(a.args) == len(b.args)
        and all(_same(p, q) for p, q in zip(a.args, b.args))
    )


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
        part = _shape_slice(shape)  # x.shape[2:][i] (MONAI's *out.shape[2:]) is x.shape[2 + i]
        if part is not None and isinstance(d, int) and d >= 0:
            shape, d = part[0], part[1] + d
        if not _whole_shape(shape):
            return None
        t = shape.args[0]
    else:
        return None
    return (t, d) if isinstance(t, fx.Node) and isinstance(d, int) else None


def _whole_shape(node: fx.Node) -> bool:
    """``x.size()`` or ``x.shape``."""
    whole_size = node.op == "call_method" and node.target == "size" and len(node.args) == 1
    return whole_size or node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _shape_slice(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(shape, a)`` when ``node`` is ``shape[a:]`` of a whole shape, with ``a >= 0``."""
    if not (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)):
        return None
    shape, part = node.args
    if not (_whole_shape(shape) and isinstance(part, slice) and part.stop is None and part.step in (None, 1)):
        return None
    start = part.start or 0
    return (shape, start) if isinstance(start, int) and start >= 0 else None


# --- tensors made from spatial sizes -> sized --------------------------------------------

_FACTORY_FUNCTIONS = {torch.zeros: "zeros", torch.ones: "ones", torch.empty: "empty", torch.full: "full"}
_FACTORY_METHODS = ("new_zeros", "new_ones", "new_empty", "new_full")


def sized(x: torch.Tensor, shape: tuple, dims: tuple[int, ...], factory: str, args: tuple, kwargs: dict):
    """``torch.<factory>(size, *args, **kwargs)``, or ``args[0].<factory>(size, *args[1:], **kwargs)``
    for a ``new_*`` method, where ``size`` is ``shape`` with each ``None`` replaced by
    ``x.shape[d]`` for the next ``d`` of ``dims``. In a tile, a tensor made from the image's
    spatial sizes (``torch.zeros(n, c, *x.shape[2:])``) has the tile's."""
    sizes = iter(x.shape[d] for d in dims)
    size = tuple(next(sizes) if s is None else s for s in shape)
    if factory in _FACTORY_METHODS:
        return getattr(args[0], factory)(size, *args[1:], **kwargs)
    return getattr(torch, factory)(size, *args, **kwargs)


def sized_factory(node: fx.Node, layouts: dict, roots: dict, is_size) -> tuple | None:
    """The arguments of ``sized`` when ``node`` makes a tensor whose spatial dims are those of
    a spatial tensor ``x`` (every spatial size of ``x`` in order, as in :func:`channel_view`):
    ``torch.zeros/ones/empty/full`` and ``Tensor.new_zeros/ones/empty/full``. Else None."""
    if node.op == "call_function" and node.target in _FACTORY_FUNCTIONS:
        factory, before, rest = _FACTORY_FUNCTIONS[node.target], (), list(node.args)
    elif node.op == "call_method" and node.target in _FACTORY_METHODS and node.args:
        factory, before, rest = node.target, (node.args[0],), list(node.args[1:])
    else:
        return None
    kwargs = dict(node.kwargs)
    if "size" in kwargs:
        shape = kwargs.pop("size")
    elif rest and isinstance(rest[0], (tuple, list)):
        shape = rest.pop(0)
    elif factory in ("full", "new_full"):
        return None
    else:  # torch.zeros(n, c, h, w): every argument is a size
        shape, rest = rest, []
    shape = list(shape) if isinstance(shape, (tuple, list)) else [shape]
    queries = [q for q in map(size_query, shape) if q is not None and q[0] in layouts]
    spatial = [t for t, d in queries if layouts[t][d % len(layouts[t])] is not None]
    for x in dict.fromkeys(spatial):
        out = _tile_shape(shape, x, layouts, roots, is_size)
        if out is not None:
            return x, tuple(out), _spatial_dims(layouts[x]), factory, tuple(before) + tuple(rest), kwargs
    return None


def channel_view(node: fx.Node, layouts: dict, roots: dict, is_size) -> tuple | None:
    """``(x, shape, dims)`` for ``regroup`` when ``node`` is a channel-only view of ``x``, else None.

    ``roots`` maps spatial nodes to a representative of their spatial size (nodes related by
    local ops share it); ``is_size(arg)`` tells whether an argument depends on spatial sizes."""
    if not is_view(node):
        return None
    x, shape = _view_args(node)
    if x not in layouts:
        return None
    out = _tile_shape(shape, x, layouts, roots, is_size)
    if out is None or not _one_channel_group(layouts[x], out):
        return None
    return x, tuple(out), _spatial_dims(layouts[x])


def _spatial_dims(layout: tuple) -> tuple[int, ...]:
    return tuple(d for d, axis in enumerate(layout) if axis is not None)


def _tile_shape(shape: list, x: fx.Node, layouts: dict, roots: dict, is_size) -> list | None:
    """``shape`` with None where an entry reads a spatial size of ``x`` (or of a tensor of its
    spatial size), when these entries read every spatial dim of ``x`` in order and no other
    entry depends on spatial sizes; else None."""
    layout = layouts[x]
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
    return out if found == [layout[d] for d in _spatial_dims(layout)] else None


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
