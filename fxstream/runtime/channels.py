"""The channel count a compiled trunk expects, checked before any pixel is read.

A lazily read image (a slide file, a memmap) with the wrong number of channels (RGBA
instead of RGB, grey instead of colour) would otherwise fail deep inside the first
tile's convolution, after its read. :func:`check` compares the input's channel count
with the trunk's first convolutions (those the image reaches through windows only) and
with a per-channel :class:`fxstream.Normalize` input transform.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.fx as fx

from ..errors import ChannelError
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
    image = next(iter(tile.graph.nodes))
    found: set[Expected] = set()
    stack = [image]
    while stack:
        node = stack.pop()
        for user in node.users:
            if _shape_query(user):
                continue
            if user.op == "call_function" and user.target is kernels.window:
                stack.append(user)
            elif user.op == "call_function" and user.target in _CONVS | _CONV_TRANSPOSES and user.args[0] is node:
                reads = _conv_input_channels(tile, user)
                if reads is None:
                    return None
                found.add(reads)
            else:
                return None
    channels = {e.channels for e in found}
    return min(found) if len(channels) == 1 else None


def _shape_query(node: fx.Node) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.shape``: reads no channels."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    return node.op == "call_function" and node.target is getattr


def _conv_input_channels(tile: fx.GraphModule, conv: fx.Node) -> Expected | None:
    weight = conv.args[1]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    w = functools.reduce(getattr, weight.target.split("."), tile)
    if conv.target in _CONV_TRANSPOSES:
        channels = w.shape[0]
    else:
        groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
        channels = w.shape[1] * groups
    return Expected(int(channels), conv.name, weight.target.rpartition(".")[0])


def check(channels: int, tile: fx.GraphModule, transform: Callable | None = None) -> None:
    """Raise :class:`ChannelError` when an input with ``channels`` channels cannot feed
    ``tile`` (after ``transform``, the compiled ``input_transform``)."""
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
