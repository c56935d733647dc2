"""The window kinds: one object per kind of sliding-window op owns everything about it.

A trunk node that reads a window of its input (``ops.Window``) has a kind: 'conv',
'max_pool', 'avg_pool', 'pad', 'slice', 'conv_transpose', 'shuffle', 'unshuffle',
'space_to_depth' or 'resample'.
Its :class:`WindowKind` says

* which extra geometry slots a tile passes it (``slots``: 'counts' for the divisors of an
  average pooling, 'trim' for ops that yield more than the node's region, 'resample' for
  interpolation taps), besides the crop/pad of its input window;
* how the tile code computes it from its window (``emit``: padding-free torch calls);
* what the memory model needs (``copies_window``: it reads a padded copy of its input at
  the image border; ``saves_input``: autograd keeps that copy; ``contiguous_input``: it
  copies a cropped, non-contiguous window).

Supporting a new window op is one ``ops/table.py`` row that classifies it, plus one entry here.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

from . import channel_ops

_CONV = {1: torch.conv1d, 2: torch.conv2d, 3: torch.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_CONV_TRANSPOSE = {1: torch.conv_transpose1d, 2: torch.conv_transpose2d, 3: torch.conv_transpose3d}


@dataclass(frozen=True)
class Emit:
    """What ``WindowKind.emit`` needs of the tile graph being built: the graph, the node,
    its window (an fx value), the op's parameters, ``value(x)`` (a weight: attribute path,
    traced node or literal, as an fx value), ``slot(kind)`` (this node's geometry entry of
    that slot kind, as an fx value), the number of spatial dims, and ``helpers``: the
    run-time functions the tile code may call (``window``, ``avg_pool``, ``resample``),
    given by the code generator, so that this table does not depend on the runtime."""

    graph: fx.Graph
    node: fx.Node
    window: fx.Node
    params: dict
    value: Any
    slot: Any
    ndim: int
    helpers: Any

    def result(self, target, args) -> fx.Node:
        return self.graph.create_node("call_function", target, args, name=self.node.name)


@dataclass(frozen=True)
class WindowKind:
    name: str
    copies_window: bool = False
    saves_input: bool = False
    contiguous_input: bool = False
    trims: bool = False  # yields more than the node's region on its window (a 'trim' slot)

    def slots(self, divisor: int | None) -> tuple[str, ...]:
        """Extra slot kinds of a node of this kind (``divisor``: avg_pool's divisor_override)."""
        return ("trim",) if self.trims else ()

    def emit(self, e: Emit) -> fx.Node:
        raise NotImplementedError


class Pad(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        return e.window  # the window already holds the padded region


class Conv(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        p = e.params
        args = (e.window, e.value(p["weight"]), e.value(p["bias"]), tuple(p["stride"]), 0, tuple(p["dilation"]))
        return e.result(_CONV[e.ndim], args + (p["groups"],))


class Slice(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        """The window holds the crop; the index (spatial slices reduced to their steps) picks
        from it, along batch and channel dims as the op does."""
        return e.result(operator.getitem, (e.window, fx.node.map_arg(e.params["index"], e.value)))


class ConvTranspose(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        p = e.params
        weight, bias = e.value(p["weight"]), e.value(p["bias"])
        args = (e.window, weight, bias, tuple(p["stride"]), 0, 0, p["groups"], tuple(p["dilation"]))
        full = e.graph.call_function(_CONV_TRANSPOSE[e.ndim], args)
        return e.result(e.helpers.window, (full, e.slot("trim")))


class PixelShuffle(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        full = e.graph.call_function(F.pixel_shuffle, (e.window, e.params["factor"]))
        return e.result(e.helpers.window, (full, e.slot("trim")))


class PixelUnshuffle(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        return e.result(F.pixel_unshuffle, (e.window, e.params["factor"]))


class SpaceToDepth(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        return e.result(channel_ops.space_to_depth, (e.window, e.params["block"], e.params["order"]))


class Resample(WindowKind):
    def slots(self, divisor: int | None) -> tuple[str, ...]:
        return ("resample",)

    def emit(self, e: Emit) -> fx.Node:
        return e.result(e.helpers.resample, (e.window, e.slot("resample")))


class MaxPool(WindowKind):
    def emit(self, e: Emit) -> fx.Node:
        p = e.params
        args = (e.window, tuple(p["kernel"]), tuple(p["stride"]), 0, tuple(p["dilation"]), False)
        return e.result(_MAX_POOL[e.ndim], args)


class AvgPool(WindowKind):
    def slots(self, divisor: int | None) -> tuple[str, ...]:
        return ("counts",) if divisor is None else ()

    def emit(self, e: Emit) -> fx.Node:
        p = e.params
        counts = e.slot("counts") if p["divisor"] is None else None
        args = (e.window, tuple(p["kernel"]), tuple(p["stride"]), counts, p["divisor"])
        return e.result(e.helpers.avg_pool, args)


WINDOWS: dict[str, WindowKind] = {
    k.name: k
    for k in (
        Pad("pad"),
        Slice("slice"),
        Conv("conv", copies_window=True, saves_input=True, contiguous_input=True),
        ConvTranspose("conv_transpose", copies_window=True, saves_input=True, contiguous_input=True, trims=True),
        PixelShuffle("shuffle", trims=True),
        PixelUnshuffle("unshuffle"),
        SpaceToDepth("space_to_depth"),
        Resample("resample"),
        MaxPool("max_pool", copies_window=True, saves_input=True),
        AvgPool("avg_pool", copies_window=True),
    )
}


def kinds_with(trait: str) -> tuple[str, ...]:
    """The kind names with a true ``trait`` (e.g. 'copies_window'), for the memory model."""
    return tuple(name for name, kind in WINDOWS.items() if getattr(kind, trait))


def slot_getter(graph: fx.Graph, geometry: fx.Node, geo, node: fx.Node, producer: str):
    """``slot(kind)``: the fx value of this node's geometry entry of that slot kind."""
    return lambda kind: graph.call_function(operator.getitem, (geometry, geo.slot(kind, node.name, producer)))
