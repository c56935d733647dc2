"""Dense outputs: U-Nets, FPN decoders, pixel (un)shuffle, fractional resampling and
transposed convolutions streamed with the whole network as the trunk.

Float64: outputs, every parameter gradient and the input gradient equal the plain
model's (RTOL64) with one tile, a few tiles and many tiles, at non-square sizes that are
not multiples of 16 wherever the model itself runs at such sizes. Losses on the
full-resolution output (pixel-wise cross-entropy, Dice) back-propagate exactly. Ops whose
output depends on the whole image's size are rejected with a message naming the node.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dense_zoo import DENSE, build
from exactness import RTOL32, RTOL64, check_streamed, rel_err

import fxstream

# Spatial input size per model. Models that only run at multiples of 16 (no size fix-up
# in the decoder: unet_x16, the bilinear U-Nets with scale_factor=2, fpn_scale) get one;
# every other model gets sizes that are not.
SIZES = {
    "unet_pad": [(75, 61), (50, 83)],
    "unet_crop": [(75, 61)],
    "unet_x16": [(80, 48)],
    "unet_bilinear": [(48, 64)],
    "unet_bilinear_corners": [(80, 48)],
    "unet_bilinear_size": [(75, 61)],
    "unet_bilinear_pad_corners": [(67, 53)],
    "fpn_scale": [(80, 48)],
    "fpn_size": [(75, 61), (33, 50)],
    "super_resolution": [(23, 19)],
    "unshuffle": [(38, 30)],  # PixelUnshuffle(2) needs even sizes
    "fractional_nearest": [(37, 29)],
    "fractional_nearest_exact": [(37, 29)],
    "fractional_bilinear": [(37, 29)],
    "fractional_bilinear_corners": [(37, 29)],
    "fractional_bicubic": [(37, 29)],
    "upsample3_bicubic_corners": [(25, 19)],
    "transposed_variety": [(29, 23)],
    "unet3d": [(12, 20, 16)],  # depth 2: multiples of 4
    "unet1d": [(5000,)],  # depth 3: a multiple of 8
    "signal1d": [(5000,)],
}

# Blocks per axis for the 'many' tiling (3D: fewer, the tile count is the cube).
MANY = {1: 8, 2: 4, 3: 3}


# Bound-based uniform blocks: the tile sizes below are computed from them, and on these
# small images the per-input split would often make one tile (see conftest.uniform_tiles).
pytestmark = pytest.mark.usefixtures("uniform_tiles", "schedule")


def minimum_tile(model) -> tuple[int, ...]:
    """The smallest tile the plan vouches for: the receptive field, an upper bound once the
    trunk upsamples (those plans compile at any tile size and fit each input size)."""
    try:
        plan = fxstream.compile(model, tile_size=1, schedule="recompute").plan
    except fxstream.TileSizeError as exc:
        return tuple(exc.minimum)
    assert not plan.exact
    return tuple(plan.receptive_field)


def tile_for_blocks(model, size, blocks) -> tuple[int, ...]:
    """A tile size whose output block is about ``ceil(out / blocks[i])`` per axis.

    The minimum tile computes a block of one output pixel; every further output pixel
    costs ``stride`` input pixels (rounded up: the block may come out a little larger).
    ``blocks`` of 0 on an axis: one block along it.
    """
    rf = minimum_tile(model)
    smodel = fxstream.compile(model, tile_size=tuple(r + 2 * s for r, s in zip(rf, size)))
    out = smodel.shape_plan(*size).output_size
    return tuple(
        r + math.ceil(s * (math.ceil(o / k) - 1)) if k else r + 2 * n
        for r, s, o, k, n in zip(rf, smodel.plan.stride, out, blocks, size)
    )


def tilings(model, size, ndim):
    """tiling name -> (tile size, minimum number of tiles)."""
    return {
        "one": (tile_for_blocks(model, size, (0,) * ndim), 1),
        "few": (tile_for_blocks(model, size, (2,) + (0,) * (ndim - 1)), 2),
        "many": (tile_for_blocks(model, size, (MANY[ndim],) * ndim), MANY[ndim] ** ndim // 2),
    }


CASES = [(name, size) for name in sorted(DENSE) for size in SIZES[name]]


@pytest.mark.parametrize("tiling", ["one", "few", "many"])
@pytest.mark.parametrize(("name", "size"), CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_dense_exact_float64(name, size, tiling):
    model, channels, ndim = build(name)
    tile, min_tiles = tilings(model, size, ndim)[tiling]
    smodel = fxstream.compile(model, tile_size=tile)
    shape_plan = smodel.shape_plan(*size)
    n = len(shape_plan.tiles)
    if tiling == "one":
        assert n == 1
    batch = 2 if tiling == "few" else 1
    x = torch.randn(batch, channels, *size, dtype=torch.float64)
    check_streamed(model, x, tile, streamed=smodel, min_tiles=min_tiles)
    # dense: the trunk is the whole network, its output is the model's output
    assert shape_plan.output_size == tuple(model(x).shape[2:])


# Models whose receptive field (about 215 pixels for the 4-level U-Net) exceeds the sizes
# above, so every tile there reads the whole image. On a long strip, the middle tiles read
# an interior window of the image: the image is cut on both sides.
STRIPS = {
    "unet_pad": [(331, 45), (37, 290)],
    "unet_bilinear_size": [(421, 35)],
    "unet_bilinear_pad_corners": [(29, 573)],
    "fpn_size": [(301, 27)],
    "unet3d": [(100, 12, 16)],
}
STRIP_CASES = [(name, size) for name in sorted(STRIPS) for size in STRIPS[name]]


@pytest.mark.parametrize(("name", "size"), STRIP_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in STRIP_CASES])
def test_dense_exact_interior_tiles(name, size):
    model, channels, ndim = build(name)
    long = max(range(ndim), key=lambda d: size[d])
    blocks = tuple(6 if d == long else 0 for d in range(ndim))
    tile = tile_for_blocks(model, size, blocks)
    smodel = fxstream.compile(model, tile_size=tile)
    tiles = smodel.shape_plan(*size).tiles
    interior = [t for t in tiles if 0 < t.region[long][0] and t.region[long][1] < size[long]]
    assert interior, [t.region for t in tiles]
    x = torch.randn(1, channels, *size, dtype=torch.float64)
    check_streamed(model, x, tile, streamed=smodel, min_tiles=5)


def test_unet_x16_needs_multiples_of_16():
    """Flavour (b) has no size fix-up: plain torch itself fails at 75x61, so the streamed
    tests of that flavour use multiples of 16."""
    model, channels, _ = build("unet_x16")
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, channels, 75, 61, dtype=torch.float64))


def test_output_larger_than_input():
    """PixelShuffle at the output: stride 1/6, every input tile yields a 6x larger block."""
    model, channels, _ = build("super_resolution")
    smodel = fxstream.compile(model, tile_size=16)
    assert smodel.plan.stride == pytest.approx((1 / 6, 1 / 6))
    shape_plan = smodel.shape_plan(23, 19)
    assert shape_plan.output_size == (138, 114)
    assert all(b > t for b, t in zip(smodel.plan.block, smodel.plan.tile_size))


# --- Losses on the full-resolution output ---------------------------------------------------


def cross_entropy(logits, target):
    return F.cross_entropy(logits, target)


def dice_loss(logits, target, eps=1.0):
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1).to(prob.dtype)
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    union = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (union + eps)).mean()


@pytest.mark.parametrize("loss_fn", [cross_entropy, dice_loss], ids=["cross_entropy", "dice"])
def test_segmentation_loss_backward_exact(loss_fn):
    """loss.backward() through the streamed U-Net fills every .grad (and the input's) with
    the plain model's values."""
    model, channels, _ = build("unet_pad")
    size = (75, 61)
    tile = tile_for_blocks(model, size, (3, 3))
    smodel = fxstream.compile(model, tile_size=tile)
    assert len(smodel.shape_plan(*size).tiles) >= 6 or smodel.schedule.carries  # carry merges (see exactness)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, channels, *size, dtype=torch.float64, generator=gen)
    target = torch.randint(0, 2, (2, *size), generator=gen)

    grads = []
    for net in (model, smodel):
        model.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        loss = loss_fn(net(xi), target)
        loss.backward()
        grads.append([loss.detach(), xi.grad] + [p.grad for p in model.parameters()])
    names = ["loss", "input"] + [n for n, _ in model.named_parameters()]
    errors = {n: rel_err(a, b) for n, a, b in zip(names, grads[1], grads[0])}
    assert all(g is not None for g in grads[1])
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL64, f"{worst}: {errors[worst]:.3e}"


def test_unet_float32():
    """float32: reassociated sums only; RTOL32 holds on the milesial U-Net with many tiles."""
    model, channels, _ = build("unet_pad")
    model = model.float()
    size = (75, 61)
    tile = tile_for_blocks(model, size, (4, 4))
    x = torch.randn(1, channels, *size)
    smodel = fxstream.compile(model, tile_size=tile)
    errors = check_streamed(model, x, tile, rtol=RTOL32, min_tiles=8, streamed=smodel)
    if smodel.shape_plan(*size).num_tiles > 1:  # carry may merge this small image into one tile
        assert max(errors.values()) > 0  # float32 really ran (different summation order)


# --- Rejections -----------------------------------------------------------------------------


class DenseNet(nn.Module):
    """conv -> <block under test> -> conv, dense output (the whole network is the trunk)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = block
        self.tail = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.tail(self.block(self.stem(x)))


class FixedSize(nn.Module):
    def forward(self, x):
        return F.interpolate(x, size=(64, 64), mode="bilinear")


class Antialias(nn.Module):
    def forward(self, x):
        return F.interpolate(x, scale_factor=0.5, mode="bilinear", antialias=True)


class OutputSize(nn.Module):
    """A transposed convolution called with ``output_size=`` (the usual way to undo a
    strided conv at odd sizes)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(self.down(x), output_size=x.size())


class PyramidPooling(nn.Module):
    """PSPNet-style: adaptive pooling to a fixed 8x8 grid in the decoder, convs on it,
    upsampled back and merged with the full-resolution branch."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        context = F.interpolate(self.conv(self.pool(x)), size=x.shape[-2:], mode="bilinear")
        return x + context


class MaxPyramidPooling(PyramidPooling):
    """The same with adaptive *max* pooling: a max over pixels is not a sum of partial sums,
    so it is not a global statistic fxstream streams."""

    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d(8)


# name -> (block, node named in the message, module path, words in the message)
REJECTED = {
    "fixed_size": (FixedSize, "interpolate", "block", ["fixed size=(64, 64)", "non-local"]),
    "antialias": (Antialias, "interpolate", "block", ["antialias"]),
    "output_size": (OutputSize, "block_up", "block.up", ["output_size=", "output_padding"]),
    "adaptive_max_pool_in_decoder": (MaxPyramidPooling, "add", "block", ["block_pool", "block.pool", "a max"]),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_dense_rejections_name_the_node(name):
    block, node, module_path, words = REJECTED[name]
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(DenseNet(block()).eval(), tile_size=64)
    err = info.value
    message = str(err)
    assert err.node == node and f"node '{node}'" in message
    assert err.module_path == module_path and f"in module '{module_path}'" in message
    assert "test_dense.py" in message  # the user's source line
    assert "fix:" in message
    for word in words:
        assert word in message, word


def test_adaptive_avg_pool_in_decoder_streams_whole_as_a_statistic():
    """Adaptive average pooling to an 8x8 grid, upsampled back: one level of global
    statistics (each tile adds to the bins it overlaps), exact."""
    torch.manual_seed(0)
    model = DenseNet(PyramidPooling()).double().eval()
    smodel = fxstream.compile(model, tile_size=12)
    assert smodel.plan.levels == 1
    check_streamed(model, torch.randn(1, 3, 29, 37, dtype=torch.float64), 12, streamed=smodel, min_tiles=4)


def test_adaptive_pool_in_decoder_streams_with_boundary():
    """The fix the message suggests: stream only the part before the global context."""
    torch.manual_seed(0)
    model = DenseNet(PyramidPooling()).double().eval()
    smodel = fxstream.compile(model, tile_size=12, boundary="stem")
    check_streamed(model, torch.randn(1, 3, 29, 37, dtype=torch.float64), 12, streamed=smodel, min_tiles=4)
