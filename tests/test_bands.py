"""Band-split carry tilings on one process (``Schedule(bands=...)``, what the ranks of a
tile group run): each band carries internally, band starts recompute their cone, and the
whole is exact in float64. Small forced tiles make bands of one to several rows."""

from __future__ import annotations

import pytest
import torch
import torchvision
from dense_zoo import build as build_dense
from exactness import check_streamed
from zoo import build as build_zoo

import fxstream
from fxstream.errors import FxStreamError

pytestmark = pytest.mark.usefixtures("float64_default")


def _banded(model, tile, bands, **kwargs):
    return fxstream.compile(model, tile_size=tile, schedule=fxstream.Schedule("carry", bands), **kwargs)


def _band_sets(rows: int) -> list[tuple[int, ...]]:
    return sorted({(0, rows // 2), (0, 1, rows - 1), tuple(range(rows))})


@pytest.mark.parametrize(
    "name,size,tile",
    [("padding_modes", (33, 27), 14), ("pools", (97, 71), 50), ("arithmetic", (29, 33), 9)],
)
def test_zoo_bands_exact(small_carry_tiles, name, size, tile):
    model, channels = build_zoo(name)
    rows = fxstream.compile(model, tile_size=tile, schedule="carry").shape_plan(*size).grid[0]
    assert rows >= 4
    for bands in _band_sets(rows):
        smodel = _banded(model, tile, bands)
        shape = smodel.shape_plan(*size)
        assert shape.schedule.bands == bands and shape.grid[0] == rows
        assert shape.halo_overhead > 1.0  # band starts recompute their cones
        check_streamed(model, torch.randn(2, channels, *size), tile, streamed=smodel)


@pytest.mark.parametrize(
    "name,size,tile", [("unet_pad", (161, 139), 128), ("unet1d", (200,), 80), ("unet3d", (44, 40, 16), 32)]
)
def test_dense_bands_exact(name, size, tile):
    """U-Net skips lag behind their deep paths: a band start recomputes a deep cone."""
    model, channels, _ = build_dense(name)
    rows = fxstream.compile(model, tile_size=tile, schedule="carry").shape_plan(*size).grid[0]
    assert rows >= 2
    bands = (0, rows // 2)
    check_streamed(model, torch.randn(1, channels, *size), tile, streamed=_banded(model, tile, bands))


def test_resnet_bands_exact(small_carry_tiles):
    model = torchvision.models.resnet18(num_classes=5).double().eval()
    for bands in ((0, 1), (0, 1, 2)):
        smodel = _banded(model, 96, bands, boundary="layer2")
        check_streamed(model, torch.randn(1, 3, 99, 70), 96, streamed=smodel, boundary="layer2")


def test_no_stripe_crosses_a_band_start(small_carry_tiles):
    model, channels = build_zoo("padding_modes")
    smodel = _banded(model, 14, (0, 5, 9))
    shape = smodel.shape_plan(33, 27)
    band = {k: max(b for b in (0, 5, 9) if b <= k) for k in range(shape.grid[0])}
    for tile in shape.tiles:
        for _, _, pieces, _ in tile.carry:
            for source, _ in pieces:
                if source >= 0:
                    assert band[source // shape.grid[1]] == band[tile.index[0]]


def test_single_band_is_the_plain_carry_tiling():
    model, _ = build_zoo("pools")
    plain = fxstream.compile(model, tile_size=50, schedule="carry").shape_plan(97, 71)
    banded = _banded(model, 50, (0,)).shape_plan(97, 71)
    assert plain.axes == banded.axes and plain.computed == banded.computed


def test_bad_bands_raise():
    with pytest.raises(FxStreamError, match="bands"):
        fxstream.Schedule("carry", (1, 2))
    with pytest.raises(FxStreamError, match="bands"):
        fxstream.Schedule("carry", (0, 2, 2))
    model, _ = build_zoo("pools")
    with pytest.raises(FxStreamError, match="tile rows"):
        _banded(model, 50, (0, 40)).shape_plan(97, 71)


def test_balanced_bands_minimise_the_largest_band():
    from fxstream.distributed import balanced_bands

    assert balanced_bands([1, 1, 1, 1], 2) == (0, 2)
    assert balanced_bands([5, 1, 1, 1, 1, 1], 2) == (0, 1)
    # a band start costs its cone: no band starts at the expensive row 1
    assert balanced_bands([2, 2, 2, 2], 2, start_work=[2, 9, 2, 3]) == (0, 2)
    assert balanced_bands([3, 1, 4, 1, 5, 9, 2, 6], 3) == (0, 4, 6)
    with pytest.raises(fxstream.TileGroupError, match="too few for 3 ranks"):
        balanced_bands([1, 1], 3)


def test_plan_ranks_shows_the_split(capsys):
    from fxstream.cli import main

    assert main(["plan", "resnet18", "--input-shape", "1,3,900,300", "--tile-size", "448", "--ranks", "2"]) == 0
    out = capsys.readouterr().out
    assert "tile-parallel split over 2 ranks" in out and "rank 1: tile rows" in out and "predicted speedup" in out
