"""The predictive memory model's structure: per-node statistics from the tiny probe run,
interior regions, monotonicity in the tile size, the symbolic form against the exact
per-tile evaluation, and N-D trunks. (Its accuracy against measured peaks is checked by
benchmarks/memory_model.py, whose output is recorded in the README.)"""

from __future__ import annotations

import math

import pytest
import sympy
import torch
import torch.nn as nn
import torchvision
from test_cli import HandDAG

import fxstream
from fxstream.cli.report import build, memory_model
from fxstream.memory.model import tile_pixels
from fxstream.planning.plan import node_regions


@pytest.fixture(autouse=True)
def recompute_default(monkeypatch):
    """The interior-tile formula and its bound are the recompute schedule's; test_auto checks
    the carry memory model against a budget."""
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", "recompute")


def _model(model, tile, shape, dtype=torch.float32):
    smodel = fxstream.compile(model.eval(), tile_size=tile)
    return memory_model(smodel, shape, dtype)


def test_probe_statistics():
    model, stats = _model(HandDAG(), 32, (1, 3, 64, 64))
    nodes = stats.by_name()
    assert nodes["x"].bytes_per_pixel == 3 * 4 and nodes["a"].bytes_per_pixel == 8 * 4
    assert nodes["out"].bytes_per_pixel == 4 * 4 and nodes["out"].shape[1] == 4
    assert not nodes["a"].saved and nodes["relu"].saved  # relu keeps its result; conv a's output is not needed
    assert nodes["pool"].extra_saved_per_pixel == 8 * 8  # int64 max-pooling indices, one per element
    assert nodes["a"].flops_per_pixel == 2 * 8 * 3 * 9
    _, half = _model(HandDAG(), 32, (1, 3, 64, 64), torch.float16)
    assert half.by_name()["a"].bytes_per_pixel == 8 * 2 and half.by_name()["pool"].extra_saved_per_pixel == 64


def test_interior_regions_are_affine_in_the_block():
    model, _ = _model(HandDAG(), 64, (1, 3, 64, 64))
    for n in (7, 40):
        lo = 12
        regions = node_regions(model.geo, (400, 400), ((lo, lo + n), (lo, lo + n)))
        for name, per_axis in model._affine.items():
            for (a, b), (r_lo, r_hi) in zip(per_axis, regions[name]):
                assert a * n + b == r_hi - r_lo, name


def test_peak_is_monotone_in_the_tile_size():
    model, _ = _model(torchvision.models.resnet18(weights=None), 1024, (2, 3, 3000, 2000))
    expr = model.peak_expr((3000, 2000))
    (t,) = expr.free_symbols
    peak = sympy.lambdify(t, expr)
    values = [peak(tile) for tile in range(435, 3200, 89)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert values[-1] > 2 * values[0]


def test_symbolic_peak_bounds_every_tile():
    image = (300, 260)
    for tile in (40, 64, 101):
        model, _ = _model(HandDAG(), tile, (1, 3, *image))
        exact = model.estimate(image).streamed_training.total
        formula = model.estimate(image, exact=False).streamed_training.total
        assert exact <= formula <= 1.3 * exact  # an upper bound, not far above
        (t,) = model.peak_expr(image).free_symbols
        assert int(model.peak_expr(image).subs(t, tile)) == formula


def test_tile_shapes_cover_the_tiling():
    model, _ = _model(HandDAG(), 40, (1, 3, 300, 260))
    shapes = tile_pixels(model.geo, model.plan, (300, 260), model.schedule)
    plan = fxstream.compile(HandDAG().eval(), tile_size=40).shape_plan(300, 260)
    assert sum(s.count for s in shapes) == len(plan.tiles)
    computed = sum(s.count * sum(s.px[n.name] for n in model.geo.steps) for s in shapes)
    assert computed == plan.computed  # the same work as the planner counts
    assert any(s.copies for s in shapes)  # border tiles pad copies of their windows
    assert any(not s.copies for s in shapes)  # interior tiles pad nothing
    interior = max((s for s in shapes if not s.copies), key=lambda s: s.px["a"])
    # b1 reads a crop of relu's region (the pool reads one pixel more): a strided view
    # that the convolution copies to a contiguous tensor.
    assert set(interior.views) == {"b1"}


def test_parts_and_streamed_versus_plain():
    net = torchvision.models.resnet18(weights=None)
    model, _ = _model(net, 768, (1, 3, 4096, 4096))
    estimate = model.estimate((4096, 4096))
    training = estimate.streamed_training
    assert training.total == sum(training.parts.values())
    params = sum(p.numel() * 4 for p in net.parameters())
    assert model.params.trunk + model.params.head == params
    assert training.parts["parameters"] == params + sum(b.numel() * b.element_size() for b in net.buffers())
    assert training.parts["trunk param grads (x2)"] == 2 * model.params.trunk
    assert training.parts["input"] == 3 * 4096 * 4096 * 4
    assert estimate.plain_training.total > 5 * training.total
    assert estimate.plain_inference.total > estimate.streamed_inference.total


class Chain1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(2, 6, 5, stride=2, padding=2)
        self.b = nn.Conv1d(6, 3, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(-1)


class Chain3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv3d(1, 4, 3, padding=1)
        self.p = nn.MaxPool3d(2)

    def forward(self, x):
        return self.p(torch.relu(self.a(x))).mean((2, 3, 4))


def test_one_and_three_spatial_dims():
    data = build(fxstream.compile(Chain1d().eval(), tile_size=32), (1, 2, 1000))
    assert data["ndim"] == 1 and data["receptive_field"] == [9] and data["stride"] == [2]
    a = next(n for n in data["nodes"] if n["name"] == "a")
    assert a["activation_bytes"] == 6 * a["interior_region"][0] * 4
    data = build(fxstream.compile(Chain3d().eval(), tile_size=(8, 10, 12)), (2, 1, 40, 30, 20))
    assert data["ndim"] == 3 and data["output_block"] == [3, 4, 5] and data["num_tiles"] == math.prod(data["grid"])
    a = next(n for n in data["nodes"] if n["name"] == "a")
    assert a["activation_bytes"] == 2 * 4 * math.prod(a["interior_region"]) * 4
    assert data["memory"]["streamed"]["training"]["bytes"] < data["memory"]["plain"]["training"]["bytes"]


class DenseHead(nn.Module):
    """A stride-2 trunk, then a plain head that upsamples and convolves at full resolution
    (a dense decoder: its activations grow with the image), gated by a pooled branch (a
    global op inside the default trunk: streamed with ``boundary="relu"``)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.up = nn.Conv2d(8, 6, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        f = torch.relu(self.down(x))
        context = self.fc(f.mean((2, 3)))
        dense = torch.relu(self.up(nn.functional.interpolate(f * context[:, :1, None, None], scale_factor=2.0)))
        return dense, context


def _head_saved_bytes(smodel, size) -> int:
    """What the head saves for backward at ``size``, measured directly on a plain run."""
    program = smodel.program()
    run = fxstream.memory.nodestats._Run(program.analysis.gm, program.analysis, 4)
    run.execute(torch.zeros(1, 3, *size))
    return run.head_bytes()[0]


def test_head_activations_are_measured_and_scale_with_the_image():
    """The plain head's saved tensors, fitted at two probe sizes, predict a third size exactly
    (a dense head is linear in the pixels), and enter the streamed and plain peaks."""
    smodel = fxstream.compile(DenseHead().eval(), tile_size=32, boundary="relu")
    model, stats = memory_model(smodel, (2, 3, 96, 80), torch.float32)
    assert stats.head is not None and stats.head.saved[1] > 0  # grows with the image
    saved, largest = stats.head.bytes(96 * 80)
    assert saved == _head_saved_bytes(smodel, (96, 80))
    assert largest == 8 * 96 * 80 * 4  # the upsampled 8-channel map, batch 1
    estimate = model.estimate((96, 80))
    phases = {estimate.streamed_training.phase: estimate.streamed_training.parts}
    assert estimate.streamed_training.total >= 2 * (saved + largest)  # batch 2
    assert estimate.plain_training.parts["head activations"] == 2 * (saved + largest), phases


def test_pooled_head_activations_are_constant():
    smodel = fxstream.compile(torchvision.models.resnet18(weights=None).eval(), tile_size=512)
    _, stats = memory_model(smodel, (1, 3, 1024, 1024), torch.float32)
    assert stats.head is not None and stats.head.saved[1] == 0 and stats.head.largest[1] == 0


def test_probe_runs_leave_no_side_effects():
    """Measuring a head in training mode (BatchNorm statistics, dropout) changes no buffer
    and no random state."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(2), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Flatten(1)
    )
    smodel = fxstream.compile(model.train(), tile_size=16, boundary="0")
    before = [b.clone() for b in model.buffers()]
    state = torch.random.get_rng_state()
    memory_model(smodel, (2, 3, 40, 40), torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(state, torch.random.get_rng_state())
