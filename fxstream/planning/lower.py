"""Stages 1 to 3 in one call: ``nn.Module`` -> :class:`Lowered` (analysis, geometry, plan).

The compiled module (:func:`fxstream.module.build_program`) generates code from a
:class:`Lowered`; the automatic choices (:mod:`fxstream.memory.auto`) read its geometry
and plan without generating anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..analysis.analyze import Analysis, analyze
from ..frontend.trace import trace
from .plan import Plan, build_plan, tile_tuple
from .schedule import Schedule, as_schedule
from .trunk import TrunkGeometry, build_geometry


@dataclass(frozen=True)
class Lowered:
    """The trunk of a model as the planner sees it, for one tile size, boundary and schedule."""

    analysis: Analysis
    geometry: TrunkGeometry
    plan: Plan
    schedule: Schedule


def lower(
    model: nn.Module,
    tile_size: int | tuple[int, ...],
    boundary: str | tuple[str, ...] | None,
    schedule=None,
    sample: torch.Tensor | None = None,
) -> Lowered:
    """``sample``: the input the tracer answers Python's size questions on (default: the
    64-pixel probe); a meta-device tensor of a real input's shape traces that size's branch."""
    gm = trace(model, sample)  # nn.Module -> fx.GraphModule (checked against the eager model)
    ndim = len(tile_size) if isinstance(tile_size, tuple) else None
    analysis = analyze(gm, boundary, ndim)  # -> Analysis: trunk, boundary, layouts
    geometry = build_geometry(analysis)  # -> TrunkGeometry: plain data
    schedule = as_schedule(schedule)  # -> Schedule: how the tiles run
    plan = build_plan(geometry, tile_tuple(tile_size, analysis.ndim), schedule.carries)  # -> Plan (sympy)
    return Lowered(analysis, geometry, plan, schedule)
