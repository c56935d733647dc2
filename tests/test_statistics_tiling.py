"""Geometry and tiling of global statistics (issue 20, step 3): the owned blocks of every
statistic's input partition it, under both schedules, with bands, at odd sizes and with
several trunk outputs; adaptive pooling bins and broadcast-back taps from the tiles'
positions equal torch's whole-map ops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_levels import PSP, GNChain, Siblings, UNetSkip

from fxstream.analysis.analyze import analyze
from fxstream.frontend.trace import trace
from fxstream.ops import statistics as st
from fxstream.planning import plan as planner
from fxstream.planning import tiling
from fxstream.planning.plan import build_plan, node_sizes
from fxstream.planning.schedule import Schedule
from fxstream.planning.trunk import build_geometry
from fxstream.runtime import kernels


class ImageMean(nn.Module):
    """A statistic of the image itself (its input is the image, not a trunk node)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3, padding=1)

    def forward(self, x):
        return self.conv(x - x.mean((2, 3), keepdim=True))


class PSPFree(PSP):
    """PSP with align_corners=False and bicubic/nearest branches."""

    def forward(self, x):
        x = self.stem(x)
        modes = ("bilinear", "bicubic", "nearest", "bilinear")
        ups = [
            F.interpolate(conv(F.adaptive_avg_pool2d(x, b)), size=x.shape[2:], mode=m)
            for b, conv, m in zip(self.bins, self.convs, modes)
        ]
        return self.out(torch.cat([x] + ups, 1))


MODELS = {
    "gn chain": (GNChain, None),
    "psp": (lambda: PSP().eval(), None),
    "psp free": (lambda: PSPFree().eval(), None),
    "unet skip": (UNetSkip, None),
    "two outputs": (UNetSkip, ("enc", "dec")),
    "siblings": (Siblings, None),
    "image mean": (ImageMean, None),
}


def lowered(name: str, tile: int, schedule: Schedule):
    factory, boundary = MODELS[name]
    torch.manual_seed(0)
    analysis = analyze(trace(factory()), boundary, None, None)
    geo = build_geometry(analysis)
    return analysis, geo, build_plan(geo, (tile, tile), schedule.carries)


def shape_plan(geo, plan, size, schedule, monkeypatch):
    """The tiles of ``size``, forced small: the plan's uniform blocks under both schedules."""
    monkeypatch.setattr(planner, "_splits", lambda geo, plan, sizes: planner.plan_splits(plan, sizes[geo.output]))
    monkeypatch.setattr(tiling, "carry_split", lambda width, n, limit, block: planner.balanced_split(n, block))
    return tiling.plan_shape(geo, plan, size, schedule)


def owned_boxes(geo, sp, stat):
    """Per tile: the global box (per axis ``(lo, hi)``) of its owned block of ``stat.input``."""
    slot = geo.slot("window", stat.name, stat.input)
    key = "" if stat.input == geo.image else stat.input
    boxes = []
    for index in itertools.product(*(range(n) for n in sp.grid)):
        parts = [sp.axes[a][k] for a, k in enumerate(index)]
        box = []
        for part in parts:
            crop = part.entries[slot]
            assert crop.pad_lo == crop.pad_hi == 0, crop
            lo = dict(part.region)[key][0]
            box.append((lo + crop.start, lo + crop.stop))
        boxes.append((index, tuple(box)))
    return boxes


SCHEDULES = {
    "carry": Schedule("carry"),
    "recompute": Schedule("recompute"),
    "carry, two bands": Schedule("carry", (0, 2)),
}


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_owned_blocks_partition_every_statistic_input(name, schedule, monkeypatch):
    schedule = SCHEDULES[schedule]
    _, geo, plan = lowered(name, 9, schedule)
    assert geo.statistics and set(geo.blocked) >= {s.input for s in geo.statistics}
    sizes_to_try = ((22, 18), (30, 26)) if "unet" in name or "two" in name else ((23, 19), (17, 30))
    for size in sizes_to_try:
        sp = shape_plan(geo, plan, size, schedule, monkeypatch)
        assert sp.num_tiles >= 4, sp.grid
        sizes = node_sizes(geo, size)
        for stat in geo.statistics:
            covered = np.zeros(sizes[stat.input], dtype=int)
            for _, ((r0, r1), (c0, c1)) in owned_boxes(geo, sp, stat):
                covered[r0:r1, c0:c1] += 1
            assert (covered == 1).all(), f"{stat.name}: {np.unique(covered)}"


@pytest.mark.parametrize("schedule", ["carry", "recompute"])
def test_bins_from_tile_positions_equal_adaptive_pooling(schedule, monkeypatch):
    """Each tile sums its owned block of an arange map into the bins it overlaps."""
    schedule = SCHEDULES[schedule]
    _, geo, plan = lowered("psp", 7, schedule)
    size = (23, 19)
    sp = shape_plan(geo, plan, size, schedule, monkeypatch)
    sizes = node_sizes(geo, size)
    for stat in geo.statistics:
        shape = sizes[stat.input]
        ramp = torch.arange(2 * 3 * shape[0] * shape[1], dtype=torch.float64).view(2, 3, *shape)
        position_slot = geo.slot("position", stat.name, stat.input)
        totals = None
        for index, ((r0, r1), (c0, c1)) in owned_boxes(geo, sp, stat):
            position = tuple(sp.axes[a][k].entries[position_slot] for a, k in enumerate(index))
            assert [(p.lo, p.hi) for p in position] == [(r0, r1), (c0, c1)]
            sums = st.partial(ramp[:, :, r0:r1, c0:c1], stat.spec, position)
            totals = sums if totals is None else tuple(a + b for a, b in zip(totals, sums))
        got = st.finish(totals, stat.spec)
        expected = F.adaptive_avg_pool2d(ramp, stat.spec.bins)
        assert torch.allclose(got, expected, rtol=1e-14, atol=0), stat.name


@pytest.mark.parametrize("schedule", ["carry", "recompute"])
@pytest.mark.parametrize("name", ["psp", "psp free"])
def test_broadcast_taps_equal_interpolate(name, schedule, monkeypatch):
    schedule = SCHEDULES[schedule]
    analysis, geo, plan = lowered(name, 7, schedule)
    size = (23, 19)
    sp = shape_plan(geo, plan, size, schedule, monkeypatch)
    sizes = node_sizes(geo, size)
    gen = torch.Generator().manual_seed(0)
    steps = [s for s in geo.steps if s.kind == "broadcast"]
    assert len(steps) == 4
    for step in steps:
        node = next(n for n in analysis.trunk if n.name == step.name)
        params = analysis.verdicts[node].params
        for bins in (1, 2, 3, 6):
            grid = torch.randn(2, 3, bins, bins + 1, generator=gen, dtype=torch.float64)
            mode = {"linear": "bilinear", "cubic": "bicubic"}.get(params["mode"], params["mode"])
            align = params["align_corners"] if mode != "nearest" else None
            whole = F.interpolate(grid, size=sizes[step.name], mode=mode, align_corners=align)
            slot = geo.slot("position", step.name, step.inputs[0])
            for index in itertools.product(*(range(n) for n in sp.grid)):
                position = tuple(sp.axes[a][k].entries[slot] for a, k in enumerate(index))
                (r0, r1), (c0, c1) = ((p.lo, p.hi) for p in position)
                assert (r0, r1) == dict(sp.axes[0][index[0]].computed)[step.name]
                part = kernels.broadcast(grid, position, params["mode"], params["align_corners"])
                assert torch.allclose(part, whole[:, :, r0:r1, c0:c1], rtol=0, atol=1e-13), (step.name, bins)


def test_plan_and_geometry_record_levels():
    _, geo, plan = lowered("gn chain", 9, SCHEDULES["carry"])
    assert geo.levels == plan.levels == 2
    assert [s.level for s in geo.statistics] == [1, 2]
    assert geo.passes == (("c1",), ("c1", "normalize", "relu", "c2"))
    assert {n.name: n.level for n in plan.nodes}["c3"] == 2
    assert "2 levels, 3 streamed passes" in str(plan)
    plan.to_json()  # plain data
