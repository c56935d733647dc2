"""Float64 equivalence of the op zoo: outputs, every parameter gradient and the input
gradient, for 1 tile, 2 tiles and many ragged tiles, batch 1 and 3, non-square sizes."""

from __future__ import annotations

import math

import pytest
import torch
from exactness import check_streamed
from zoo import ZOO, build

import fxstream

# Tile sizes here are chosen to force several tiles on small images (conftest.uniform_tiles).
pytestmark = pytest.mark.usefixtures("uniform_tiles", "schedule")

SIZES = [(37, 29), (50, 41)]


def tile_sizes(model, size):
    """Tile sizes giving one tile, two tiles and many tiles for an input of ``size``."""
    with pytest.raises(fxstream.TileSizeError) as info:
        fxstream.compile(model, tile_size=1, schedule="recompute")
    rf = info.value.minimum
    plan = fxstream.compile(model, tile_size=tuple(rf)).plan
    out = fxstream.compile(model, tile_size=tuple(max(s, r) for s, r in zip(size, rf))).shape_plan(*size).output_size
    stride = plan.stride
    one = tuple(r + s * (o - 1) for r, s, o in zip(rf, stride, out))
    two = (rf[0] + stride[0] * (math.ceil(out[0] / 2) - 1),) + one[1:]
    many = tuple(r + s for r, s in zip(rf, stride))  # blocks of 2 output pixels, ragged ends
    return {"one": (one, 1), "two": (two, 2), "many": (many, 4)}


@pytest.mark.parametrize("name", sorted(ZOO))
@pytest.mark.parametrize("tiling", ["one", "two", "many"])
def test_zoo_exact_float64(name, tiling):
    model, channels = build(name)
    batch = 3 if tiling == "many" else 1
    for size in SIZES:
        tile, min_tiles = tile_sizes(model, size)[tiling]
        x = torch.randn(batch, channels, *size, dtype=torch.float64)
        smodel = fxstream.compile(model, tile_size=tile)
        n = len(smodel.shape_plan(*size).tiles)
        if tiling == "one":
            assert n == 1
        elif tiling == "two":
            assert n == 2 or smodel.shape_plan(*size).output_size[0] == 1 or smodel.schedule.carries
        check_streamed(model, x, tile, min_tiles=min_tiles if n > 1 else 1, streamed=smodel)


@pytest.mark.parametrize("name", ["conv_variety", "pools", "branchy_dag", "convnext_style"])
def test_zoo_float32(name):
    """float32: streamed and whole-image results differ by reassociated sums; the bound
    RTOL32 = 1e-4 (relative to the largest entry) holds with margin on these nets."""
    model, channels = build(name)
    model = model.float()
    tile = tile_sizes(model, SIZES[1])["many"][0]
    x = torch.randn(2, channels, *SIZES[1])
    check_streamed(model, x, tile, min_tiles=4)


def test_tile_smaller_than_image_larger_than_tile():
    """An image smaller than one tile streams as a single clipped tile."""
    model, channels = build("batchnorm")
    x = torch.randn(1, channels, 9, 13, dtype=torch.float64)
    smodel = fxstream.compile(model, tile_size=512)
    assert len(smodel.shape_plan(9, 13).tiles) == 1
    check_streamed(model, x, 512, streamed=smodel)


def test_per_dim_tile_size():
    model, channels = build("conv_variety")
    smodel = fxstream.compile(model, tile_size=(40, 30))
    assert smodel.plan.tile_size == (40, 30)
    x = torch.randn(1, channels, 61, 47, dtype=torch.float64)
    check_streamed(model, x, (40, 30), streamed=smodel, min_tiles=4)


def test_conv1d_and_conv3d_chains():
    """The geometry is dimension-generic: 1D and 3D convolution/pooling chains stream exactly."""
    torch.manual_seed(0)
    net1d = torch.nn.Sequential(
        torch.nn.Conv1d(2, 4, 5, padding=2, padding_mode="reflect"),
        torch.nn.ReLU(),
        torch.nn.AvgPool1d(3, 2, 1, count_include_pad=False),
        torch.nn.Conv1d(4, 3, 4, stride=2),
    ).double()
    check_streamed(net1d, torch.randn(2, 2, 301, dtype=torch.float64), 40, min_tiles=4)
    net3d = torch.nn.Sequential(
        torch.nn.Conv3d(1, 2, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool3d(2, ceil_mode=True),
        torch.nn.Conv3d(2, 2, (3, 1, 3), padding=(1, 0, 1)),
    ).double()
    check_streamed(net3d, torch.randn(1, 1, 19, 14, 17, dtype=torch.float64), (10, 8, 10), min_tiles=4)
