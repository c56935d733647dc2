"""Global statistics at run time: the passes of one call of a trunk with statistics (issue 20,
``docs/design-statistics.md``).

The trunk's generated *driver* (``codegen.driver_graph``, printed by ``smodel.code``) takes
the call's :class:`CallState` and runs, per level ``j``, :func:`statistics` (pass ``j``), then
the statistic head's nodes of level ``j`` (plain torch ops on small tensors: SE's MLP,
``rsqrt(var + eps)``), and last :func:`stream` (the output pass)::

    def forward(self, call):
        statistics_1 = statistics(call, 1)          # pass 1: the finished mean of the SE block
        mean = statistics_1[0]
        se_fc1 = self.se.fc1(mean)                  # the statistic head, as traced
        ...
        sigmoid = torch.sigmoid(se_fc2)
        return stream(call, sigmoid)                # the output pass, reading the gate

Each pass is one application of :class:`~fxstream.runtime.executor.StreamFunction` whose
inputs include the statistic values it reads, so ``loss.backward()`` runs the passes'
backward functions in reverse order by itself: the output pass first, then the heads'
backward (plain autograd), then pass ``L``, ..., pass 1. No adjoint is written by hand.

A pass's statistics come back as float64 sums over the tiles' owned blocks;
``ops.statistics.finish`` turns them into exactly what the original op returns (its dtype
included). Every pass of a call shares the tiling and the random draws (dropout between two
levels draws the same masks in every pass). Under carry each pass keeps its own stripes: a
statistics pass's backward rebuilds its stripes band by band with a no-grad carry (as a
banded backward does), so the output pass's store is freed during its own backward.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedOpError, user_error
from ..io import transfer
from ..ops import statistics as st
from .executor import Pass, StreamFunction


class CallState:
    """What the passes of one call of the trunk share: the input, its tiling (one
    ``ShapePlan`` for every pass), the positions this process runs, the random draws, the
    (each pass keeps its own stripes: a statistics pass's backward rebuilds them)."""

    def __init__(self, trunk, x):
        size = tuple(x.shape[d] for d in trunk.input_dims)
        if trunk.tile_group is not None:  # before any other collective: every rank has the same image
            trunk.tile_group.check_shape(tuple(x.shape), trunk.compute_device(x), transfer.fingerprint(x))
        if not torch.is_grad_enabled() and isinstance(x, torch.Tensor):
            x = x.detach()  # inference: nothing to differentiate (and no graph to keep)
        self.trunk, self.x = trunk, x
        self.shape_plan = trunk.shape_plan(size)
        self.positions = trunk.positions(self.shape_plan)
        self.random = trunk.random_draws(x)


def statistics(call: CallState, level: int, *values) -> tuple:
    """Pass ``level``: the finished value of each of its statistics (a tuple, in
    ``geometry.statistics`` order), given the ``values`` of lower levels its nodes read."""
    trunk = call.trunk
    specs = [s.spec for s in trunk.geometry.statistics if s.level == level]
    fixed, offset = set(), 0
    for spec in specs:  # each partial: its sums, a count and a dtype probe (not differentiable)
        offset += spec.reduction.sums + 2
        fixed |= {offset - 2, offset - 1}
    run = Pass(call.shape_plan, trunk.pass_tiles[level - 1], level, len(values), call, frozenset(fixed))
    sums = _apply(call, run, values)
    results, offset = [], 0
    for spec in specs:
        n = spec.reduction.sums + 2
        results.append(st.finish(sums[offset : offset + n], spec))
        offset += n
    return tuple(results)


def stream(call: CallState, *values):
    """The output pass: the trunk output(s), reading the statistic ``values``."""
    return _apply(call, Pass(call.shape_plan, None, None, len(values), call), values)


def _apply(call: CallState, run: Pass, values: tuple):
    trunk = call.trunk
    check_values(trunk, trunk.pass_values.get(run.level, ()), values)
    module = run.module if run.module is not None else trunk.tile
    params = [p for p in module.parameters() if p.requires_grad] if torch.is_grad_enabled() else []
    return StreamFunction.apply(call.x, trunk, run, *values, *params)


def check_values(trunk, names: tuple, values: tuple) -> None:
    """A statistic read pointwise must have size 1 along the spatial dims of the node that
    reads it (aligned from the right, as broadcasting aligns them): a grid combined pixel by
    pixel with the image only lines up with it at one size."""
    for name, value in zip(names, values):
        for rank, dims, consumer in trunk.value_checks.get(name, ()):
            offset = rank - value.dim()
            if offset < 0 or any(d - offset >= 0 and value.shape[d - offset] != 1 for d in dims):
                raise user_error(
                    UnsupportedOpError,
                    f"cannot stream '{consumer}': it combines the image pixel by pixel with '{name}', a global "
                    f"statistic of shape {tuple(value.shape)} that is not 1 along the spatial dims, so it lines up "
                    "with the image at one size only",
                    node=consumer,
                    op="statistic",
                    fix="resample the statistic to the image (F.interpolate(grid, size=x.shape[2:])), or pass "
                    "boundary=... to stream only the part before it",
                )
