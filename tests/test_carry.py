"""The carry schedule: cells, stripes and pending gradients (see fxstream.tiling and
fxstream.executor). Every test compares with the plain model in float64 using the
schedule's own (fitted) tiling at small tile sizes, so cells are small, ragged, and
stripes often span several earlier cells."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torchvision
from dense_zoo import build as build_dense
from exactness import RTOL64, check_streamed, rel_err
from zoo import build as build_zoo

import fxstream
from fxstream.planning.tiling import cell_boundaries, plan_shape

pytestmark = pytest.mark.usefixtures("float64_default")


def _carry(model, tile, **kwargs):
    return fxstream.compile(model, tile_size=tile, schedule="carry", **kwargs)


@pytest.mark.parametrize(
    "name,size,tile",
    [
        ("conv_variety", (45, 38), 24),
        ("pools", (97, 71), 50),
        ("padding_modes", (33, 27), 14),
        ("branchy_dag", (47, 35), 30),
        ("convnext_style", (31, 26), 18),
        ("arithmetic", (29, 33), 9),
    ],
)
def test_zoo_many_small_carry_tiles(name, size, tile):
    model, channels = build_zoo(name)
    x = torch.randn(2, channels, *size)
    smodel = _carry(model, tile)
    shape = smodel.shape_plan(*size)
    assert shape.schedule.kind == "carry" and shape.num_tiles >= 4
    assert shape.halo_overhead == 1.0  # every activation computed once
    check_streamed(model, x, tile, streamed=smodel)


@pytest.mark.parametrize(
    "name,size,tile",
    [
        ("unet_pad", (161, 139), 128),
        ("unet_bilinear_corners", (256, 224), 200),
        ("fpn_size", (83, 70), 48),
        ("super_resolution", (23, 19), 8),
        ("fractional_bicubic", (31, 27), 12),
        ("transposed_variety", (26, 23), 12),
        ("unet1d", (200,), 80),
        ("unet3d", (44, 40, 16), 32),
    ],
)
def test_dense_lagging_skips_and_upsampling(name, size, tile):
    """U-Net skips lag behind their deep paths: the skip keeps a wide stripe."""
    model, channels, ndim = build_dense(name)
    x = torch.randn(1, channels, *size)
    smodel = _carry(model, tile)
    assert smodel.shape_plan(*size).num_tiles >= 2 ** min(ndim, 2)
    check_streamed(model, x, tile, streamed=smodel)


def test_resnet_residual_blocks():
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    x = torch.randn(1, 3, 131, 97)
    smodel = _carry(model, 96, boundary="layer2")
    assert smodel.shape_plan(131, 97).num_tiles >= 4
    check_streamed(model, x, 96, streamed=smodel, boundary="layer2")


def test_densenet_concatenations():
    model = torchvision.models.densenet121(num_classes=3).double().eval()
    x = torch.randn(1, 3, 83, 70)
    smodel = _carry(model, 64, boundary="features.transition1")
    assert smodel.shape_plan(83, 70).num_tiles >= 4
    check_streamed(model, x, 64, streamed=smodel, boundary="features.transition1")


def test_cells_partition_every_node_and_reads_stay_behind():
    """The tiling's invariant, checked directly: per axis, every node's cells partition it,
    and the region a tile offers its consumers ends at its own cell's end."""
    model, _, _ = build_dense("unet_crop")
    smodel = _carry(model, 128)
    geo, plan = smodel.program().geometry, smodel.plan
    shape = plan_shape(geo, plan, (177, 166), smodel.schedule)
    assert shape.num_tiles >= 4
    for axis, parts in enumerate(shape.axes):
        cells = {}
        for part in parts:
            computed, region = dict(part.computed), dict(part.region)
            for name, (lo, hi) in computed.items():
                if name:
                    cells.setdefault(name, []).append((lo, hi))
                    assert region[name][1] == hi and region[name][0] <= lo
        sizes = fxstream.planning.plan.node_sizes(geo, (177, 166))
        for name, spans in cells.items():
            assert spans[0][0] == 0 and spans[-1][1] == sizes[name][axis]
            assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(spans, spans[1:])), (name, spans)
    assert shape.stripe_pixels  # something is carried


def test_cell_boundaries_of_a_chain():
    """3x3 convs with padding 1: a producer's cell ends one pixel after its consumer's."""
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, padding=1))
    smodel = _carry(model, 16)
    geo = smodel.program().geometry
    sizes = fxstream.planning.plan.node_sizes(geo, (30, 30))
    bounds = cell_boundaries(geo, sizes, 0, [0, 10, 20, 30])
    names = [s.name for s in geo.steps]
    assert bounds[names[-1]] == [0, 10, 20, 30]
    assert bounds[names[-2]] == [0, 11, 21, 30]
    assert bounds[names[-3]] == [0, 12, 22, 30]
    assert bounds[geo.image] == [0, 13, 23, 30]


def test_ragged_last_cells_merge_instead_of_emptying():
    """A last output block thinner than the halo would leave early nodes an empty cell:
    the tiling merges it into its neighbour rather than running an empty tile."""
    model = nn.Sequential(*[nn.Conv2d(1, 1, 5, padding=2) for _ in range(4)])
    smodel = _carry(model, 30)
    shape = smodel.shape_plan(61, 9)
    for parts in shape.axes:
        for part in parts:
            assert all(hi > lo for name, (lo, hi) in part.computed)
    check_streamed(model, torch.randn(1, 1, 61, 9), 30, streamed=smodel)


def test_carry_computes_no_halo_and_fewer_tiles_than_recompute():
    model = torchvision.models.resnet18().double().eval()
    carry = _carry(model, 128, boundary="layer2").shape_plan(256, 256)
    recompute = fxstream.compile(model, 128, boundary="layer2", schedule="recompute").shape_plan(256, 256)
    assert carry.halo_overhead == 1.0 < recompute.halo_overhead
    assert carry.num_tiles < recompute.num_tiles


def test_dropout_replay_under_carry():
    """Keyed dropout draws by global position: the carry tiles' cells draw the same masks
    as recompute tiles, and the backward recomputation replays them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.Dropout(0.3), nn.Conv2d(4, 3, 3, padding=1)).train()
    x = torch.randn(1, 2, 37, 29)
    outs, grads = {}, {}
    for schedule in ("carry", "recompute"):
        smodel = fxstream.compile(model, tile_size=14, schedule=schedule)
        assert smodel.shape_plan(37, 29).num_tiles >= 4
        torch.manual_seed(5)
        out = smodel(x)
        g = torch.autograd.grad(out, list(model.parameters()), torch.ones_like(out))
        outs[schedule], grads[schedule] = out.detach(), g
    assert rel_err(outs["carry"], outs["recompute"]) <= RTOL64
    for a, b in zip(grads["carry"], grads["recompute"]):
        assert rel_err(a, b) <= RTOL64


def test_autocast_bfloat16_matches_recompute():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2, padding=1)).float()
    x = torch.randn(1, 3, 40, 33, dtype=torch.float32)
    results = {}
    for schedule in ("carry", "recompute"):
        smodel = fxstream.compile(model, tile_size=16, schedule=schedule)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = smodel(x)
        g = torch.autograd.grad(out.float().sum(), list(model.parameters()))
        results[schedule] = (out.float(), g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x)
    # bfloat16 rounding differs with summation order; both streams stay close to the plain result
    for out, _ in results.values():
        assert out.dtype == torch.float32 and rel_err(out, ref.float()) < 2e-2


def test_serial_backward_over_differently_sized_images():
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2), nn.Flatten(2))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    net = nn.Sequential(model[:3], head)
    images = [torch.randn(1, 3, 41, 30), torch.randn(1, 3, 27, 52)]
    targets = [torch.tensor([0]), torch.tensor([1])]
    loss_fn = nn.CrossEntropyLoss()
    net.zero_grad()
    expected = sum(loss_fn(net(x), t) for x, t in zip(images, targets)) / 2
    expected.backward()
    reference = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    smodel = fxstream.compile(net, tile_size=14, schedule="carry")
    loss = fxstream.serial_backward(smodel, loss_fn, images, targets)
    assert abs(loss.item() - expected.item()) < 1e-12
    for p, r in zip(net.parameters(), reference):
        assert rel_err(p.grad, r) <= RTOL64


def test_host_input_uint8_with_normalize():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=2, dilation=2))
    image = torch.randint(0, 256, (1, 3, 45, 38), dtype=torch.uint8)
    norm = fxstream.Normalize((0.5, 0.4, 0.3), (0.2, 0.3, 0.25), scale=1 / 255)
    smodel = _carry(model, 16, input_transform=norm)
    ref = model(norm(image, torch.float64))
    out = smodel(image)
    assert rel_err(out, ref) <= RTOL64
    g_ref = torch.autograd.grad(ref.sum(), list(model.parameters()))
    g_out = torch.autograd.grad(smodel(image).sum(), list(model.parameters()))
    for a, b in zip(g_out, g_ref):
        assert rel_err(a, b) <= RTOL64


@pytest.mark.parametrize("schedule", ["carry", "recompute"])
def test_gradcheck_with_default_settings(schedule):
    """Repeated backward passes are bit-identical (fixed reverse order), so gradcheck's
    reentrancy check passes; under carry a second backward rebuilds the stripe store."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 1, 3, stride=2, padding=1))
    smodel = fxstream.compile(model, tile_size=8, schedule=schedule)
    x = torch.randn(1, 1, 11, 9, requires_grad=True)
    assert smodel.shape_plan(11, 9).num_tiles >= 2
    assert torch.autograd.gradcheck(smodel, (x,))


def test_retain_graph_backward_twice_is_bit_identical():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    smodel = _carry(model, 12)
    x = torch.randn(1, 2, 30, 23, requires_grad=True)
    out = smodel(x)
    first = torch.autograd.grad(out.sum(), [x] + list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(out.sum(), [x] + list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_create_graph_raises():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh())
    smodel = _carry(model, 8)
    x = torch.randn(1, 1, 17, 13, requires_grad=True)
    with pytest.raises(fxstream.FxStreamError, match="create_graph"):
        torch.autograd.grad(smodel(x).sum(), list(model.parameters()), create_graph=True, allow_unused=True)


def test_stripe_store_is_freed_after_backward():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1))
    smodel = _carry(model, 10)
    x = torch.randn(1, 1, 31, 29)
    out = smodel(x)
    fn = out.grad_fn
    assert fn.store  # kept for the backward pass
    out.sum().backward()
    assert fn.store is None


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(fxstream.FxStreamError, match="schedule"):
        fxstream.compile(nn.Conv2d(1, 1, 3), tile_size=8, schedule="fast")


def test_plan_splits_agree_with_tiles():
    model, channels = build_zoo("pools")
    smodel = _carry(model, 50)
    shape = smodel.shape_plan(97, 71)
    blocks = [t.block for t in shape.tiles]
    assert len(blocks) == shape.num_tiles == len(set(blocks))
    per_axis = [sorted({b[a] for b in blocks}) for a in range(2)]
    assert set(blocks) == set(itertools.product(*per_axis))
