"""Equivalence of streamed and unstreamed torchvision models (random init, eval mode).

Every model is built with ``weights=None`` (nothing is ever downloaded), its
normalisation statistics and affine parameters are randomised so that their gradients
are non-trivial, and it is compiled with tile sizes derived from the plan's receptive
field ``rf`` and cumulative stride ``S``: a tile of ``rf + S * (b - 1)`` pixels yields
an output block of exactly ``b`` trunk pixels. The exactness check (tests/exactness.py)
compares the output, every parameter gradient and the input gradient.

Cost note: float64 convolutions on CPU take the slow reference kernels (no oneDNN), so
the images are small, just large enough for the trunk output to span several tiles.
Since most receptive fields (435 to 2071 pixels) exceed these images, the input region
of such a tile is clipped to the image while the deeper nodes compute genuinely partial
regions; VGG11 (rf 150) and the float32 ResNet18 test use images larger than a tile,
so their tiles crop the input as well. Whole file: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
from exactness import RTOL32, check_streamed
from torch import nn
from torchvision import models as tvm

import fxstream

# Tile sizes here are chosen to force several tiles on small images (conftest.uniform_tiles).
pytestmark = pytest.mark.usefixtures("uniform_tiles", "schedule")

# name -> (receptive field, cumulative stride, boundary node, the global op that consumes it)
STRUCTURE = {
    "resnet18": (435, 32, "layer4_1_relu_1", "avgpool"),
    "resnet50": (427, 32, "layer4_2_relu_2", "avgpool"),
    "vgg11": (150, 32, "features_20", "avgpool"),  # AdaptiveAvgPool2d((7, 7)): not local
    "vgg11_features": (150, 32, "_20", None),  # dense trunk: the boundary is the model output
    "mobilenet_v2": (491, 32, "features_18_2", "adaptive_avg_pool2d"),
    "convnext_tiny": (1688, 32, "add_17", "avgpool"),
    "densenet121": (2071, 32, "relu", "adaptive_avg_pool2d"),
    "regnet_x_400mf": (975, 32, "trunk_output_block4_block4_11_activation", "avgpool"),
}


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Make every normalisation non-trivial: with the default init (mean 0, var 1, weight 1,
    bias 0, ConvNeXt layer_scale 1e-6) BatchNorm is near-identity and ConvNeXt blocks
    near-zero, so their gradients would test little."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_(0.0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:  # includes LayerNorm2d
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
            if isinstance(getattr(m, "layer_scale", None), nn.Parameter):  # ConvNeXt CNBlock
                m.layer_scale.uniform_(0.2, 1.0, generator=gen)
    return model


def build(name: str, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in place: no float32 copy of VGG's 100M-weight Linear
    try:
        if name == "vgg11_features":
            model = tvm.vgg11(weights=None).features
        else:
            model = getattr(tvm, name)(weights=None)
    finally:
        torch.set_default_dtype(previous)
    return randomize(model.eval(), seed + 1)


def tile_for(name: str, block) -> int | tuple[int, ...]:
    """Input tile edge that yields an output block of ``block`` trunk pixels per axis."""
    rf, stride = STRUCTURE[name][:2]
    if isinstance(block, int):
        return rf + stride * (block - 1)
    return tuple(rf + stride * (b - 1) for b in block)


def image(batch: int, h: int, w: int, dtype=torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, dtype=dtype, generator=torch.Generator().manual_seed(seed))


def assert_tiling(smodel, size, out_size, block, grid):
    """The tiles of ``size`` form exactly the expected grid of output blocks over ``out_size``:
    per axis the fewest blocks of at most ``block``, their sizes differing by at most one."""
    sp = smodel.shape_plan(*size)
    block = (block,) * len(size) if isinstance(block, int) else tuple(block)
    assert tuple(sp.output_size) == tuple(out_size)
    assert tuple(smodel.plan.block) == block
    if smodel.schedule.carries:  # carry merges blocks whose cells would be empty (test_carry counts tiles)
        assert all(g <= want for g, want in zip(sp.grid, grid))
        return sp
    assert tuple(sp.grid) == tuple(grid)
    assert tuple(grid) == tuple(math.ceil(n / b) for n, b in zip(out_size, block))
    assert len(sp.tiles) == math.prod(grid)
    for axis, (n, b) in enumerate(zip(out_size, block)):
        spans = sorted({t.block[axis] for t in sp.tiles})
        assert spans[0][0] == 0 and spans[-1][1] == n and len(spans) == math.ceil(n / b)
        assert all(prev[1] == nxt[0] for prev, nxt in zip(spans, spans[1:]))  # contiguous partition
        lengths = {hi - lo for lo, hi in spans}
        assert max(lengths) <= b and max(lengths) - min(lengths) <= 1
    return sp


# (model, batch, H, W, output block per tile, trunk output size, expected grid).
# Heaviest cases (measured > ~5 s on one core) are marked slow; they still run in CI.
SLOW = pytest.mark.slow
CASES = [
    # ResNet18: one tile, two tiles (ragged: 8 = 6 + 2), many tiles ragged on both axes.
    pytest.param("resnet18", 1, 235, 171, 8, (8, 6), (1, 1), id="resnet18-b1-235x171-1tile"),
    pytest.param("resnet18", 3, 235, 171, 6, (8, 6), (2, 1), id="resnet18-b3-235x171-2tiles", marks=SLOW),
    pytest.param("resnet18", 1, 235, 171, (3, 4), (8, 6), (3, 2), id="resnet18-b1-235x171-6tiles"),
    pytest.param("resnet18", 3, 99, 75, 1, (4, 3), (4, 3), id="resnet18-b3-99x75-12tiles", marks=SLOW),
    # ResNet50 (bottlenecks).
    pytest.param("resnet50", 3, 131, 99, 2, (5, 4), (3, 2), id="resnet50-b3-131x99-6tiles", marks=SLOW),
    pytest.param("resnet50", 1, 99, 75, (4, 2), (4, 3), (1, 2), id="resnet50-b1-99x75-2tiles"),
    # VGG11 trunk alone (dense output: the trunk is the whole model) and the full model,
    # whose head starts with AdaptiveAvgPool2d((7, 7)) and has the real 25088x4096 Linear
    # (affordable: built directly in float64, ~1 GB of weights, batch 1).
    # Tile 182 < 235: tiles read genuinely cropped input rows; the max pools floor odd sizes.
    pytest.param("vgg11_features", 1, 235, 171, 2, (7, 5), (4, 3), id="vgg11_features-b1-235x171-12tiles", marks=SLOW),
    pytest.param("vgg11", 1, 150, 107, 2, (4, 3), (2, 2), id="vgg11-b1-150x107-4tiles", marks=SLOW),
    # MobileNetV2 (depthwise, ReLU6, inverted residuals).
    pytest.param("mobilenet_v2", 1, 99, 75, (3, 2), (4, 3), (2, 2), id="mobilenet_v2-b1-99x75-4tiles"),
    pytest.param("mobilenet_v2", 3, 67, 45, 1, (3, 2), (3, 2), id="mobilenet_v2-b3-67x45-6tiles"),
    # RegNetX (grouped convolutions).
    pytest.param("regnet_x_400mf", 3, 99, 75, (3, 2), (4, 3), (2, 2), id="regnet_x_400mf-b3-99x75-4tiles"),
    # ConvNeXt (unpadded 4x4/2x2 downsampling, 7x7 depthwise, channel LayerNorm through
    # Permute, layer_scale, LayerNorm2d in the head) and DenseNet121 (concatenations,
    # flooring avg-pool transitions, functional relu as the boundary).
    pytest.param("convnext_tiny", 1, 131, 99, (3, 2), (4, 3), (2, 2), id="convnext_tiny-b1-131x99-4tiles", marks=SLOW),
    pytest.param("convnext_tiny", 3, 67, 45, 1, (2, 1), (2, 1), id="convnext_tiny-b3-67x45-2tiles"),
    pytest.param("densenet121", 1, 131, 99, (3, 2), (4, 3), (2, 2), id="densenet121-b1-131x99-4tiles"),
    pytest.param("densenet121", 3, 67, 45, 1, (2, 1), (2, 1), id="densenet121-b3-67x45-2tiles"),
]


@pytest.mark.parametrize("name,batch,h,w,block,out_size,grid", CASES)
def test_streamed_matches_float64(request, name, batch, h, w, block, out_size, grid):
    model = build(name)
    tile = tile_for(name, block)
    smodel = fxstream.compile(model, tile_size=tile)
    assert smodel.plan.boundary == STRUCTURE[name][2]
    assert_tiling(smodel, (h, w), out_size, block, grid)
    errors = check_streamed(model, image(batch, h, w), tile, streamed=smodel, min_tiles=math.prod(grid))
    worst = max(errors, key=errors.get)
    print(f"\n{request.node.callspec.id}: max relative error {errors[worst]:.2e} ({worst})")


@pytest.mark.slow
def test_resnet18_float32_many_tiles():
    """float32, and images larger than one tile, so every tile crops its input region.

    Bound: RTOL32 = 1e-4 from exactness.py. Streamed and whole-image computations are the
    same arithmetic in a different summation order (oneDNN picks its blocking per tile
    shape, weight gradients are summed tile by tile), so they differ only by float32
    rounding: eps32 ~ 6e-8 accumulated over reductions of up to ~1e4 terms (3x3x512 conv
    sums, weight-gradient sums over the image) and ~20 layers gives relative errors of
    order 1e-6..1e-5; 1e-4 keeps a margin while still catching any real halo or
    padding error, which is O(1) relative.
    """
    model = build("resnet18", torch.float32)
    block = (8, 6)
    tile = tile_for("resnet18", block)  # (659, 595)
    smodel = fxstream.compile(model, tile_size=tile)
    # 937 -> 469 -> 235 -> 118 -> 59 -> 30 ; 681 -> 341 -> 171 -> 86 -> 43 -> 22
    # 30 = 8 + 8 + 8 + 6 and 22 = 6 + 6 + 6 + 4: ragged on both axes.
    sp = assert_tiling(smodel, (937, 681), (30, 22), block, (4, 4))
    assert all(t.region[0] != (0, 937) and t.region[1] != (0, 681) for t in sp.tiles)  # every tile crops
    x = image(1, 937, 681, torch.float32)
    errors = check_streamed(model, x, tile, rtol=RTOL32, streamed=smodel, min_tiles=16)
    worst = max(errors, key=errors.get)
    print(f"\nresnet18 float32: max relative error {errors[worst]:.2e} ({worst})")


# --- Structure: receptive field, stride, boundary, minimum tile ------------------------


@pytest.mark.parametrize("name", list(STRUCTURE))
def test_plan_structure(name):
    rf, stride, boundary, global_op = STRUCTURE[name]
    model = build(name, torch.float32)
    smodel = fxstream.compile(model, tile_size=tile_for(name, 1))
    plan = smodel.plan
    assert plan.receptive_field == (rf, rf)
    assert plan.stride == (stride, stride)
    assert plan.block == (1, 1)
    assert plan.boundary == boundary
    assert sum(plan.halo[0]) == rf - stride  # rf = S + halo_left + halo_right

    # The boundary is the last trunk op: the global op of the head is its only user.
    gm = fxstream.trace(model)
    node = next(n for n in gm.graph.nodes if n.name == boundary)
    users = [u.name for u in node.users]
    if global_op is None:
        assert users == ["output"]
    else:
        assert users == [global_op]

    # The minimum tile is the receptive field, reported by the error.
    with pytest.raises(fxstream.TileSizeError) as info:
        fxstream.compile(model, tile_size=1, schedule="recompute")
    assert tuple(info.value.minimum) == (rf, rf)
    with pytest.raises(fxstream.TileSizeError):
        fxstream.compile(model, tile_size=rf - 1, schedule="recompute")

    # tile = rf + S * (b - 1) is the smallest tile giving a block of b; one pixel less gives b - 1.
    b = 4
    assert fxstream.compile(model, tile_size=tile_for(name, b)).plan.block == (b, b)
    assert fxstream.compile(model, tile_size=tile_for(name, b) - 1).plan.block == (b - 1, b - 1)


def test_resnet18_plan_nodes():
    """Spot-check the per-node plan of ResNet18 against the hand-derived values."""
    smodel = fxstream.compile(build("resnet18", torch.float32), tile_size=435)
    nodes = {n.name: n for n in smodel.plan.nodes}
    assert nodes["conv1"].stride == (2, 2) and nodes["conv1"].receptive_field == (7, 7)
    assert nodes["maxpool"].stride == (4, 4) and nodes["maxpool"].receptive_field == (11, 11)
    assert nodes["layer1_1_relu_1"].stride == (4, 4) and nodes["layer1_1_relu_1"].receptive_field == (43, 43)
    assert nodes["layer4_1_relu_1"].stride == (32, 32) and nodes["layer4_1_relu_1"].receptive_field == (435, 435)
    assert "avgpool" not in nodes and "fc" not in nodes  # the head is not streamed


# --- Dense output: torchvision's FCN (IntermediateLayerGetter, FCNHead, dict output, bilinear
# upsampling to the input's size: `size=` computed from the image's shape). ---------------------


class SegmentationOut(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def fcn(layer: str, channels: int) -> nn.Module:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    backbone = IntermediateLayerGetter(tvm.resnet18(weights=None), {layer: "out"})
    return randomize(SegmentationOut(FCN(backbone, FCNHead(channels, 3))), seed=5).double().eval()


# Several tiles. Under recompute a (150, 170) tile is below the receptive field (152) plus
# one output row, so every tile computed one row (1099 tiles, h = 260: minutes); (240, 240)
# gives 2 x 2 tiles (h = 2.2). Carry tiles need no halo: (150, 170) gives 13 x 4.
SEVERAL_FCN_TILES = {"carry": (150, 170), "recompute": (240, 240)}


@pytest.mark.parametrize("tiling", ["one", "several"])
def test_fcn_dense_output_streams_exactly(tiling, schedule):
    model = fcn("layer2", 128)  # stride 8, bilinear x8 back to the input size
    tile, min_tiles = (10_000, 1) if tiling == "one" else (SEVERAL_FCN_TILES[schedule], 4)
    smodel = fxstream.compile(model, tile_size=tile)
    assert min_tiles <= len(smodel.shape_plan(157, 131).tiles) <= 100
    check_streamed(model, image(1, 157, 131), tile, min_tiles=min_tiles, streamed=smodel)


def test_fcn_resnet18_full_depth_dense_output_one_tile():
    model = fcn("layer4", 512)  # stride 32: receptive field 531 px, so one tile at this size
    check_streamed(model, image(1, 120, 97), 700)
