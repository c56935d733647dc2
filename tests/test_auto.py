"""tile_size="auto" and boundary="auto": the choice respects the budget as predicted, is
the largest tile that does, impossible budgets are errors, cut candidates separate the
trunk, and the compiled choice is exact."""

from __future__ import annotations

import pytest
import torch
import torchvision
from exactness import check_streamed
from test_cli import HandDAG

import fxstream
from fxstream.errors import TileSizeError
from fxstream.memory.auto import choose, cut_candidates, largest_tile
from fxstream.memory.model import MemoryModel, parameter_bytes
from fxstream.memory.nodestats import measure
from fxstream.memory.units import parse_bytes
from fxstream.planning.plan import build_plan


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("1.5GB") == 1_500_000_000
    assert parse_bytes(4096) == 4096 and parse_bytes("4096") == 4096
    for bad in ("8XB", "-1GiB", "GiB", "", 0, -5):
        with pytest.raises(ValueError, match="memory budget must look like"):
            parse_bytes(bad)


@pytest.fixture(autouse=True)
def recompute_default(monkeypatch):
    """These tests check the recompute schedule's interior-tile formula against its exact
    tiles; test_auto_tile_under_carry checks the carry schedule."""
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", "recompute")


def test_auto_tile_under_carry(monkeypatch):
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", "carry")
    model = torchvision.models.resnet18(weights=None).eval()
    shape = (1, 3, 1500, 1300)
    budget = 300 * 2**20
    choice = choose(model, "auto", None, budget, shape)
    smodel = fxstream.compile(model, tile_size=choice.tile_size)
    assert smodel.schedule.kind == "carry" and smodel.shape_plan(*shape[2:]).num_tiles > 1
    program = smodel.program()
    stats = measure(program.analysis, program.geometry, shape[1], torch.float32)
    params = parameter_bytes(program.analysis, {s.name for s in program.geometry.steps}, 4)
    memory = MemoryModel(program.geometry, program.plan, stats, params, shape[0], schedule=program.schedule)
    assert 0 < memory.stripe_bytes(shape[2:]) < memory.estimate(shape[2:]).streamed_training.total <= budget


def _memory(model, tile, shape):
    program = fxstream.compile(model, tile_size=tile).program()
    stats = measure(program.analysis, program.geometry, shape[1], torch.float32)
    params = parameter_bytes(program.analysis, {s.name for s in program.geometry.steps}, 4)
    plan = build_plan(program.geometry, (tile,) * program.geometry.ndim)
    return MemoryModel(program.geometry, plan, stats, params, shape[0])


def test_auto_tile_is_the_largest_that_fits():
    model = torchvision.models.resnet18(weights=None).eval()
    shape = (1, 3, 3000, 2500)
    budget = 400 * 2**20
    choice = choose(model, "auto", None, budget, shape)
    tile = choice.tile_size
    memory = _memory(model, tile, shape)
    formula = largest_tile(memory, shape[2:], budget)  # the largest by the interior-tile formula
    assert memory.training_peak(shape[2:], formula) <= budget < memory.training_peak(shape[2:], formula + 1)
    assert tile <= formula  # then shrunk until the exact tiles of this input fit
    assert memory.estimate(shape[2:]).streamed_training.total <= budget
    step = max(1, tile // 32)
    assert _memory(model, tile + step, shape).estimate(shape[2:]).streamed_training.total > budget or tile == formula
    assert choice.boundary is None and "within the budget" in choice.reason
    assert choose(model, "auto", None, "64GiB", shape).tile_size >= 3000  # one tile covers the image


def test_compile_auto_is_exact_and_verbose(capsys):
    model = HandDAG().double().eval()
    shape = (1, 3, 90, 70)
    smodel = fxstream.compile(model, "auto", memory_budget=600_000, input_shape=shape, verbose=True)
    reason = capsys.readouterr().out
    tile = smodel.plan.tile_size[0]
    assert reason.startswith(f"fxstream: chose tile_size={tile}")
    check_streamed(model, torch.randn(*shape, dtype=torch.float64), None, streamed=smodel, min_tiles=4)


def test_impossible_budget_and_missing_arguments():
    model = HandDAG().eval()
    with pytest.raises(TileSizeError, match="is too small for input_shape"):
        fxstream.compile(model, "auto", memory_budget="10KiB", input_shape=(1, 3, 500, 500))
    with pytest.raises(TileSizeError, match="with tile_size=64"):
        fxstream.compile(model, 64, boundary="auto", memory_budget="10KiB", input_shape=(1, 3, 500, 500))
    with pytest.raises(TileSizeError, match="need input_shape"):
        fxstream.compile(model, "auto", memory_budget="1GiB")
    with pytest.raises(TileSizeError, match="memory budget must look like"):
        fxstream.compile(model, "auto", memory_budget="lots", input_shape=(1, 3, 64, 64))
    with pytest.raises(TileSizeError, match="need memory_budget"):
        fxstream.compile(model, "auto", input_shape=(1, 3, 64, 64))


def test_cut_candidates_separate_the_trunk():
    program = fxstream.compile(HandDAG().eval(), tile_size=64).program()
    # b1, pool and b2 sit on parallel branches: cutting there would leave an edge across.
    assert cut_candidates(program.geometry, program.plan) == ["relu", "out"]
    program = fxstream.compile(torchvision.models.resnet18(weights=None).eval(), tile_size=512).program()
    cuts = cut_candidates(program.geometry, program.plan)
    assert cuts == ["relu", "layer1_1_relu_1", "layer2_1_relu_1", "layer3_1_relu_1", "layer4_1_relu_1"]


def test_auto_boundary_streams_a_prefix_exactly(capsys):
    model = HandDAG().double().eval()
    shape = (1, 3, 80, 60)
    smodel = fxstream.compile(model, 24, boundary="auto", memory_budget="1GiB", input_shape=shape, verbose=True)
    reason = capsys.readouterr().out
    # With room to spare, running the stride-2 part plainly beats recomputing its halos.
    assert smodel.plan.boundary == "relu" and "fastest within the budget" in reason
    check_streamed(model, torch.randn(*shape, dtype=torch.float64), None, streamed=smodel, min_tiles=4)


def test_auto_boundary_falls_back_to_the_whole_trunk_when_the_rest_is_too_big():
    model = torchvision.models.resnet18(weights=None).eval()
    shape = (1, 3, 4096, 4096)
    choice = choose(model, "auto", "auto", "1GiB", shape)
    fits = {c.boundary: c.tile is not None and c.cost != float("inf") for c in choice.candidates}
    assert not fits["relu"]  # a full-resolution plain remainder cannot fit 1 GiB
    assert fits[choice.boundary]
    assert choice.boundary in ("layer3_1_relu_1", "layer4_1_relu_1")
