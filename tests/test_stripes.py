"""Where the carry schedule keeps its stripes (``Schedule.stripes``): every placement is
exact in float64 (outputs, every parameter gradient, the input gradient), and the stores
hold what they should when they should.

On this CPU, ``stripes="host"`` runs the host store with clones for the copies (the same
put/get/prefetch/release bookkeeping as pinned copies on CUDA; tests/test_cuda_stripes.py
runs the real ones). ``stripes="banded"`` rebuilds every band but the last with a no-grad
carry before back-propagating it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from dense_zoo import build as build_dense
from exactness import RTOL64, check_streamed, rel_err
from test_multi_output import Pyramid
from zoo import build as build_zoo

import fxstream
from fxstream import Schedule
from fxstream.errors import FxStreamError
from fxstream.runtime import stripes as stripe_stores

pytestmark = pytest.mark.usefixtures("float64_default")

PLACEMENTS = {
    "host": Schedule("carry", stripes="host"),
    "banded1": Schedule("carry", stripes="banded", band_rows=1),
    "banded2": Schedule("carry", stripes="banded", band_rows=2),
}


def _compile(model, tile, placement, **kwargs):
    return fxstream.compile(model, tile_size=tile, schedule=PLACEMENTS[placement], **kwargs)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name,size,tile", [("padding_modes", (33, 27), 14), ("branchy_dag", (41, 37), 20)])
def test_zoo_exact(small_carry_tiles, placement, name, size, tile):
    model, channels = build_zoo(name)
    smodel = _compile(model, tile, placement)
    shape = smodel.shape_plan(*size)
    assert shape.grid[0] >= 3 and shape.num_tiles >= 6
    if placement.startswith("banded"):
        assert len(shape.band_ranges(range(shape.num_tiles))) >= 2 and shape.halo_overhead > 1.0
    check_streamed(model, torch.randn(2, channels, *size), tile, streamed=smodel)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_dense_3d_exact(placement):
    model, channels, _ = build_dense("unet3d")
    size, tile = (44, 40, 16), 32
    smodel = _compile(model, tile, placement)
    assert smodel.shape_plan(*size).grid[0] >= 2
    check_streamed(model, torch.randn(1, channels, *size), tile, streamed=smodel)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_lagging_skips_exact(placement):
    """A U-Net's skips lag behind its deep path: wide stripes, deep band-start cones."""
    model, channels, _ = build_dense("unet_pad")
    smodel = _compile(model, 128, placement)
    assert smodel.shape_plan(161, 139).grid[0] >= 2
    check_streamed(model, torch.randn(1, channels, 161, 139), 128, streamed=smodel)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_multi_output_trunk_exact(small_carry_tiles, placement):
    torch.manual_seed(0)
    model = Pyramid().eval()
    smodel = _compile(model, 24, placement)
    assert smodel.shape_plan(61, 45).grid[0] >= 3
    check_streamed(model, torch.randn(1, 3, 61, 45), 24, streamed=smodel)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_dropout_replay(placement):
    """Train-mode dropout draws by global position: a banded rebuild and the recomputation
    replay the forward pass's masks, so every placement matches recompute."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Dropout(0.3), nn.Conv2d(4, 3, 3, padding=1)).train()
    x = torch.randn(1, 2, 47, 29)
    results = {}
    for name, schedule in (("recompute", "recompute"), (placement, PLACEMENTS[placement])):
        smodel = fxstream.compile(model, tile_size=14, schedule=schedule)
        assert smodel.shape_plan(47, 29).grid[0] >= 3
        torch.manual_seed(5)
        out = smodel(x)
        results[name] = out.detach(), torch.autograd.grad(out, list(model.parameters()), torch.ones_like(out))
    (out_a, grads_a), (out_b, grads_b) = results.values()
    assert rel_err(out_b, out_a) <= RTOL64
    for a, b in zip(grads_b, grads_a):
        assert rel_err(a, b) <= RTOL64


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_retain_graph_twice_is_bit_identical(placement):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    smodel = fxstream.compile(model, tile_size=12, schedule=PLACEMENTS[placement])
    x = torch.randn(1, 2, 40, 23, requires_grad=True)
    assert smodel.shape_plan(40, 23).grid[0] >= 3
    out = smodel(x)
    first = torch.autograd.grad(out.sum(), [x] + list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x] + list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    reference = torch.autograd.grad(model(x).sum(), [x] + list(model.parameters()))
    assert all(rel_err(a, b) <= RTOL64 for a, b in zip(first, reference))


def test_autocast_bfloat16_is_bit_identical_to_the_device_store():
    """The rebuild and the recomputation run in the forward pass's autocast state: host and
    banded stripes give the bits of the device store over the same tiling (banded carry's
    tiling is the device store's with a band at every ``band_rows`` rows)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).float()
    x = torch.randn(1, 3, 50, 33, dtype=torch.float32)

    def run(schedule):
        smodel = fxstream.compile(model, tile_size=16, schedule=schedule)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = smodel(x)
        return smodel, out, torch.autograd.grad(out.float().sum(), list(model.parameters()))

    def same(a, b):
        return torch.equal(a[1], b[1]) and all(torch.equal(p, q) for p, q in zip(a[2], b[2]))

    device = run(Schedule("carry", stripes="device"))
    assert same(run(PLACEMENTS["host"]), device)
    banded = run(PLACEMENTS["banded1"])
    rows = banded[0].shape_plan(50, 33).grid[0]
    assert rows >= 3 and same(banded, run(Schedule("carry", tuple(range(rows)), stripes="device")))


def _store_after_forward(schedule):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    smodel = fxstream.compile(model, tile_size=10, schedule=schedule)
    out = smodel(torch.randn(1, 1, 51, 29))
    return smodel, out


def test_host_store_keeps_no_stripe_on_the_device_after_the_forward_pass():
    smodel, out = _store_after_forward(PLACEMENTS["host"])
    store = out.grad_fn.store
    stripes = smodel.streamed_trunk.stripes(smodel.shape_plan(51, 29))
    assert isinstance(store, stripe_stores.HostStripes)
    assert not store.live and set(store.host) == set(stripes.source)  # every stripe, on the host
    out.sum().backward()
    assert out.grad_fn.store is None and not store.host and not store.fetched


def test_banded_forward_keeps_only_the_last_band():
    smodel, out = _store_after_forward(PLACEMENTS["banded1"])
    shape = smodel.shape_plan(51, 29)
    stripes = smodel.streamed_trunk.stripes(shape)
    last = shape.band_ranges(range(shape.num_tiles))[-1]
    store = out.grad_fn.store
    assert set(store.live) == {k for k, p in stripes.source.items() if p in last} != set(stripes.source)
    out.sum().backward()
    assert smodel.last_stats.rebuild_tiles == shape.num_tiles - len(last)


def test_device_store_keeps_every_stripe():
    smodel, out = _store_after_forward(Schedule("carry", stripes="device"))
    stripes = smodel.streamed_trunk.stripes(smodel.shape_plan(51, 29))
    assert set(out.grad_fn.store.live) == set(stripes.source)


def test_inference_keeps_no_store():
    for schedule in PLACEMENTS.values():
        smodel, _ = _store_after_forward(schedule)
        with torch.no_grad():
            out = smodel(torch.randn(1, 1, 51, 29))
        assert out.grad_fn is None


def test_default_placement_follows_the_compute_device():
    assert Schedule().placement("cuda") == "host" and Schedule().placement("cpu") == "device"
    assert Schedule("carry", stripes="banded").placement("cuda") == "banded"
    assert Schedule("recompute").placement("cuda") is None
    assert fxstream.compile(nn.Conv2d(1, 1, 3), tile_size=8, schedule="carry").schedule == Schedule()


def test_band_starts():
    assert Schedule("carry", stripes="banded", band_rows=2).band_starts(7) == (0, 2, 4, 6)
    assert Schedule("carry", (0, 3), stripes="banded", band_rows=2).band_starts(7) == (0, 2, 3, 5)
    assert Schedule("carry", stripes="banded").band_starts(9) == (0, 4, 8)  # DEFAULT_BAND_ROWS
    assert Schedule("carry", (0, 3)).band_starts(7) == (0, 3)  # tile-group bands only


def test_step_ratio_of_each_placement():
    assert Schedule("carry", stripes="host").step_ratio(1.0) == pytest.approx(4 / 3)
    assert Schedule("carry", stripes="banded").step_ratio(1.0, bands=1) == pytest.approx(4 / 3)
    assert Schedule("carry", stripes="banded").step_ratio(1.0, bands=10**6) == pytest.approx(5 / 3)
    assert Schedule("carry", stripes="banded").step_ratio(1.1, bands=4) == pytest.approx(4.75 * 1.1 / 3)


def test_bad_placements_raise():
    with pytest.raises(FxStreamError, match="(?s)stripes=.disk.*use one of"):
        Schedule("carry", stripes="disk")
    with pytest.raises(FxStreamError, match="recompute schedule, which keeps no stripes"):
        Schedule("recompute", stripes="host")
    with pytest.raises(FxStreamError, match="band_rows=0"):
        Schedule("carry", stripes="banded", band_rows=0)
    with pytest.raises(FxStreamError, match="band_rows=2"):
        Schedule("carry", stripes="host", band_rows=2)


# --- memory_budget chooses where the stripes live ------------------------------------------


def _stripe_net(**kwargs):
    """The stripe-heavy net of tests/test_memory_truth.py, in float32 (the budgets below are)."""
    from test_memory_truth import StripeNet

    torch.manual_seed(0)
    return StripeNet(**kwargs).float().eval()


def _fits(model, choice, shape, device: str, budget: int) -> bool:
    from fxstream.cli.report import memory_model

    smodel = fxstream.compile(model, tile_size=choice.tile_size, schedule=choice.schedule)
    memory, _ = memory_model(smodel, shape, torch.float32, device)
    return memory.budgeted(memory.estimate(shape[2:]).streamed_training) <= budget


def test_auto_keeps_the_stripes_on_the_device_when_they_fit():
    from fxstream.memory.auto import choose

    model, shape = _stripe_net(), (1, 3, 2048, 2048)
    for device in ("cpu", "cuda"):
        choice = choose(model, "auto", None, "400MiB", shape, device=device)
        assert choice.schedule.stripes == "device" and _fits(model, choice, shape, device, 400 * 2**20)


def test_auto_chooses_banded_on_a_cpu_and_host_on_an_accelerator_when_the_budget_requires():
    """A 2048² image through full-resolution 7x7 convolutions: the stripe store does not fit
    150 MiB at any tile on a CPU (banded carry does), nor 100 MiB on an accelerator (host
    stripes do: the device keeps a window)."""
    from fxstream.memory.auto import choose

    model, shape = _stripe_net(), (1, 3, 2048, 2048)
    choice = choose(model, "auto", None, "150MiB", shape, device="cpu")
    assert choice.schedule.banded and choice.schedule.band_rows >= 1
    assert _fits(model, choice, shape, "cpu", 150 * 2**20) and "banded carry rebuilds them" in choice.reason
    choice = choose(model, "auto", None, "100MiB", shape, device="cuda")
    assert choice.schedule.stripes == "host" and _fits(model, choice, shape, "cuda", 100 * 2**20)
    assert "kept in host memory" in choice.reason


def test_compile_auto_banded_is_exact(capsys):
    model = _stripe_net(channels=8, layers=3).double()
    shape = (1, 3, 200, 160)
    smodel = fxstream.compile(model, "auto", memory_budget="3MiB", input_shape=shape, verbose=True)
    assert smodel.schedule.banded and "stripes='banded'" in capsys.readouterr().out
    plan = smodel.shape_plan(*shape[2:])
    assert len(plan.band_ranges(range(plan.num_tiles))) >= 2
    check_streamed(model, torch.randn(*shape), None, streamed=smodel)


def test_explicit_placement_is_kept_by_auto():
    from fxstream.memory.auto import choose

    model, shape = _stripe_net(), (1, 3, 1024, 1024)
    choice = choose(model, "auto", None, "400MiB", shape, schedule=Schedule("carry", stripes="host"), device="cuda")
    assert choice.schedule == Schedule("carry", stripes="host")
