"""The compiled module is a drop-in nn.Module: shared parameters, same state_dict keys,
working .to()/.double(), optimizers, frozen parameters, no_grad inference; the plan is
an immutable, printable, JSON-serialisable value."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from exactness import check_streamed, rel_err
from zoo import build

import fxstream


def test_state_dict_and_parameters_are_shared():
    model, _ = build("arithmetic")
    smodel = fxstream.compile(model, tile_size=16)
    assert list(smodel.state_dict()) == list(model.state_dict())
    assert [id(p) for p in smodel.parameters()] == [id(p) for p in model.parameters()]
    for (name, a), (_, b) in zip(smodel.state_dict().items(), model.state_dict().items()):
        assert a.data_ptr() == b.data_ptr(), name


def test_state_dict_round_trip_loads_into_plain_model():
    model, channels = build("batchnorm")
    smodel = fxstream.compile(model, tile_size=16)
    other, _ = build("batchnorm", seed=1)
    smodel.load_state_dict(other.state_dict())
    x = torch.randn(1, channels, 21, 18, dtype=torch.float64)
    assert torch.allclose(smodel(x), other(x), rtol=1e-12, atol=1e-12)
    fresh, _ = build("batchnorm", seed=2)
    fresh.load_state_dict(smodel.state_dict())
    assert torch.allclose(fresh(x), other(x), rtol=1e-12, atol=1e-12)


def test_optimizer_on_original_parameters_trains_streamed_model():
    model, channels = build("classifier")
    reference, _ = build("classifier")
    smodel = fxstream.compile(model, tile_size=12)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    x = torch.randn(3, channels, 30, 26, dtype=torch.float64)
    target = torch.tensor([0, 3, 1])
    for _ in range(3):
        for net, optimizer in ((smodel, opt), (reference, ref_opt)):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(net(x), target).backward()
            optimizer.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert rel_err(p.detach(), q.detach()) < 1e-10, name


def test_dtype_move_after_compile_stays_exact():
    model, channels = build("convnext_style")
    model = model.float()
    smodel = fxstream.compile(model, tile_size=20)
    smodel.double()
    assert next(model.parameters()).dtype == torch.float64
    check_streamed(model, torch.randn(2, channels, 33, 27, dtype=torch.float64), 20, streamed=smodel, min_tiles=4)


def test_frozen_parameters_and_input_without_grad():
    model, channels = build("conv_variety")
    model.a.weight.requires_grad_(False)
    smodel = fxstream.compile(model, tile_size=40)
    x = torch.randn(1, channels, 57, 44, dtype=torch.float64)
    out = smodel(x)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert model.a.weight.grad is None
    model.zero_grad()
    model(x).square().sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert rel_err(grads[name], p.grad) < 1e-10, name


def test_no_grad_inference_and_requires_grad_input():
    model, channels = build("pools")
    smodel = fxstream.compile(model, tile_size=(97, 61))
    x = torch.randn(2, channels, 131, 97, dtype=torch.float64)
    with torch.no_grad():
        out = smodel(x)
    assert not out.requires_grad
    assert rel_err(out, model(x).detach()) < 1e-12
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)


def test_gradient_accumulates_across_calls_like_plain_model():
    model, channels = build("batchnorm")
    smodel = fxstream.compile(model, tile_size=12)
    x = torch.randn(1, channels, 25, 19, dtype=torch.float64)
    for _ in range(2):
        smodel(x).sum().backward()
    streamed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    for _ in range(2):
        model(x).sum().backward()
    for a, b in zip(streamed, model.parameters()):
        assert rel_err(a, b.grad) < 1e-10


def test_plan_is_an_immutable_printable_value():
    model, _ = build("branchy_dag")
    plan = fxstream.compile(model, tile_size=24).plan
    assert plan == fxstream.compile(model, tile_size=24).plan
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.block = (1, 1)
    text = str(plan)
    assert "receptive field" in text and plan.boundary in text
    data = json.loads(plan.to_json())
    assert data["receptive_field"] == list(plan.receptive_field)
    assert {n["name"] for n in data["nodes"]} >= {"stem", "down", "tail"}


def test_generated_code_is_readable():
    model, _ = build("padding_modes")
    smodel = fxstream.compile(model, tile_size=24)
    code = smodel.code
    assert "fxstream_trunk" in code
    assert "torch.conv2d" in code and "fxstream_runtime_kernels_window" in code
    tile_code = smodel.streamed_trunk.tile.code
    assert "padding" not in tile_code.split("def forward")[1].split("\n")[0]
    smodel.streamed_trunk.tile.graph.lint()


def test_shape_plan_grid_and_halo_overhead():
    model, _ = build("conv_variety")
    smodel = fxstream.compile(model, tile_size=(40, 30))
    shape_plan = smodel.shape_plan(61, 47)
    assert shape_plan.grid[0] * shape_plan.grid[1] == len(shape_plan.tiles)
    blocks = [t.block for t in shape_plan.tiles]
    covered = sum((b[0][1] - b[0][0]) * (b[1][1] - b[1][0]) for b in blocks)
    assert covered == shape_plan.output_size[0] * shape_plan.output_size[1]  # a partition
    assert shape_plan.halo_overhead >= 1.0


def test_an_axis_that_fits_in_the_tile_is_one_block():
    """The plan's block assumes interior tiles (halo on both sides); per input, the planner
    cuts the fewest blocks whose exact regions fit the tile, so an image axis no longer
    than the tile is one block, whatever the receptive field."""
    import torchvision

    smodel = fxstream.compile(torchvision.models.resnet18(weights=None).eval(), tile_size=640)
    assert smodel.plan.block == (7, 7)  # (640 - receptive field) / 32 + 1, for interior tiles
    one = smodel.shape_plan(256, 200)
    assert len(one.tiles) == 1 and one.halo_overhead == 1.0
    strip = smodel.shape_plan(2000, 600)  # only the long axis is tiled
    assert strip.grid[1] == 1 and strip.grid[0] > 1
    assert all(t.region[0][1] - t.region[0][0] <= 640 for t in strip.tiles)


def test_inference_under_no_grad_keeps_no_graph():
    """Under no_grad the streamed forward keeps nothing for a backward pass: the last tile's
    graph is kept only when gradients are wanted."""
    model, channels = build("conv_variety")
    x = torch.randn(1, channels, 61, 47, dtype=torch.float64)
    smodel = fxstream.compile(model, tile_size=(40, 30))
    trunk = smodel.streamed_trunk
    kept = []
    run_tile = trunk.run_tile

    def recording(crop, tile, run, random=None):
        blocks = run_tile(crop, tile, run, random)
        kept.append(blocks[0].requires_grad)
        return blocks

    trunk.run_tile = recording
    with torch.no_grad():
        smodel(x)
    assert kept and not any(kept)
    kept.clear()
    smodel(x.requires_grad_(True))
    assert kept[-1] and not any(kept[:-1])  # only the last forward tile records a graph
