"""The channel count (and dtype) a compiled trunk expects, checked before any pixel is read.

A lazily read image (a slide file, a memmap) with the wrong number of channels (RGBA
instead of RGB, grey instead of colour) would otherwise fail deep inside the first
tile's convolution, after its read. :func:`check` compares the input's channel count
with the trunk's first convolutions (those the image reaches through windows only) and
with a per-channel :class:`fxstream.Normalize` input transform; and refuses an integer
image (``uint8``) that would reach those convolutions without an input transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from ..errors import ChannelError, InputShapeError, user_error
from ..io import arrays
from . import kernels

_KEEP = (
    "fxstream.open_image(path, channels=range({n})) keeps the first {n} of a file; "
    "x[:, :{n}] of a numpy array is a view"
)
_CONVS = {torch.conv1d, torch.conv2d, torch.conv3d}
_CONV_TRANSPOSES = {torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d}


class Expected(NamedTuple):
    channels: int
    node: str  # the tile graph node that reads the image
    module_path: str  # the module owning its weight, or ""


def expected(tile: fx.GraphModule) -> Expected | None:
    """The channel count the first convolutions of ``tile`` read from its image input, or
    None when the image reaches something else first (pointwise ops, a concatenation...)
    or the convolutions disagree."""
    found: set[Expected] = set()
    for conv in first_convolutions(tile) or ():
        reads = _conv_input_channels(tile, conv)
        if reads is None:
            return None
        found.add(reads)
    channels = {e.channels for e in found}
    return min(found) if len(channels) == 1 else None


def first_convolutions(tile: fx.GraphModule) -> list[fx.Node] | None:
    """The convolution nodes of ``tile`` that read its image input through windows only,
    or None when the image reaches anything else first."""
    image = next(iter(tile.graph.nodes))
    convs = []
    stack = [image]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _shape_query(user):
                continue
            if user.op == "call_function" and user.target is kernels.window:
                stack.append(user)
            elif user.op == "call_function" and user.target in _CONVS | _CONV_TRANSPOSES and user.args[0] is node:
                convs.append(user)
            else:
                return None
    return convs


def _shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.shape``: reads no channels."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr


def _weight(tile: fx.GraphModule, conv: fx.Node) -> torch.Tensor | None:
    weight = conv.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    return functools.reduce(getattr, weight.target.split("."), tile)


def _conv_input_channels(tile: fx.GraphModule, conv: fx.Node) -> Expected | None:
    w = _weight(tile, conv)
    if w is None:
        return None
    weight = conv.args[1]
    if conv.target in _CONV_TRANSPOSES:
        channels = w.shape[0]
    else:
        groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
        channels = w.shape[1] * groups
    return Expected(int(channels), conv.name, weight.target.rpartition(".")[0])


def check(channels: int, tile: fx.GraphModule, transform: Callable | None = None, dtype=None) -> None:
    """Raise :class:`ChannelError` when an input with ``channels`` channels cannot feed
    ``tile`` (after ``transform``, the compiled ``input_transform``), and
    :class:`InputShapeError` when an input of ``dtype`` (torch or numpy) cannot."""
    if dtype is not None and transform is None:
        _check_dtype(dtype if isinstance(dtype, torch.dtype) else arrays.torch_dtype(dtype), tile)
    stats = getattr(transform, "mean", ()), getattr(transform, "std", ())
    per_channel = {len(s) for s in stats if len(s) > 1}
    for n in per_channel:
        if n != channels:
            raise ChannelError(
                f"the input has {channels} channels, but input_transform {transform!r} normalises {n}. "
                f"Fix: give the transform {channels} means and stds, or feed a {n}-channel image "
                f"({_KEEP.format(n=n)})."
            )
    want = expected(tile)
    if want is None or want.channels == channels:
        return
    where = f"module '{want.module_path}'" if want.module_path else "the trunk"
    raise ChannelError(
        f"the input has {channels} channels, but {where} (node '{want.node}') reads {want.channels}. "
        f"Fix: feed a {want.channels}-channel image ({_KEEP.format(n=want.channels)}), or build the model "
        f"with {channels} input channels.",
        expected=want.channels,
        got=channels,
        node=want.node,
        module_path=want.module_path,
    )


def _check_dtype(dtype: torch.dtype, tile: fx.GraphModule) -> None:
    """An integer image into floating convolutions fails in the first tile (torch converts
    nothing): refuse it before any pixel is read. (A model that converts the image itself
    reaches something else than a convolution first, and is not checked.)"""
    if dtype.is_floating_point or dtype.is_complex:
        return
    for conv in first_convolutions(tile) or ():
        weight = _weight(tile, conv)
        if weight is not None and weight.is_floating_point():
            raise user_error(
                InputShapeError,
                f"the input is {str(dtype).removeprefix('torch.')} and the trunk's first convolution computes in "
                f"{str(weight.dtype).removeprefix('torch.')}: fxstream does not convert the image by itself",
                node=conv.name,
                module_path=conv.args[1].target.rpartition(".")[0],
                fix="pass input_transform=fxstream.Normalize(mean, std, scale=1/255) to fxstream.compile (each tile "
                "is converted on the device; the image stays uint8), or feed a floating-point image",
            )
