"""Block fitting for trunks that upsample.

Their shape-independent plan comes from affine bounds of floor/ceiling regions, so its
receptive field and block are conservative. Each input size therefore gets, per axis, the
fewest blocks whose exact input regions fit ``tile_size`` (``plan._splits``):
fewer, larger tiles than the bounds allow, and ``tile_size`` still holds for every tile.
"""

from __future__ import annotations

import pytest
import torch
from dense_zoo import build
from exactness import check_streamed

import fxstream


@pytest.fixture(autouse=True)
def recompute_default(monkeypatch):
    """These check the recompute schedule's fitted blocks against its bounds; test_carry checks carry tilings."""
    monkeypatch.setattr(fxstream.planning.schedule, "DEFAULT", "recompute")


def widest(shape_plan) -> tuple[int, ...]:
    ndim = len(shape_plan.input_size)
    return tuple(max(t.region[a][1] - t.region[a][0] for t in shape_plan.tiles) for a in range(ndim))


@pytest.mark.parametrize(
    ("name", "size", "tile"), [("unet_pad", (331, 45), (280, 100)), ("fpn_size", (301, 27), (90, 60))]
)
def test_fitted_blocks_are_larger_than_bounds_and_respect_tile_size(name, size, tile, monkeypatch):
    model, channels, _ = build(name)
    smodel = fxstream.compile(model, tile_size=tile)
    assert not smodel.plan.exact
    fitted = smodel.shape_plan(*size)
    assert all(w <= t for w, t in zip(widest(fitted), tile))
    assert len(fitted.tiles) >= 2

    with monkeypatch.context() as m:  # the same tile size with the plan's bound-based blocks
        m.setattr(
            fxstream.planning.plan,
            "_splits",
            lambda geo, plan, sizes: fxstream.planning.plan.plan_splits(plan, sizes[geo.output]),
        )
        bounded = fxstream.compile(model, tile_size=tile).shape_plan(*size)
    assert len(fitted.tiles) < len(bounded.tiles), (len(fitted.tiles), len(bounded.tiles))
    assert fitted.halo_overhead < bounded.halo_overhead

    x = torch.randn(1, channels, *size, dtype=torch.float64)
    check_streamed(model, x, tile, streamed=smodel, min_tiles=2)


def test_tile_below_the_bound_compiles_and_fits_the_real_region():
    """The plan's receptive field is a bound: a tile below it but above the real need works."""
    model, channels, _ = build("unet_bilinear_size")
    bound = fxstream.compile(model, tile_size=10_000).plan.receptive_field
    size = (421, 35)
    real = fxstream.planning.plan.input_region(
        fxstream.compile(model, tile_size=10_000).program().geometry, size, ((200, 201), (17, 18))
    )
    need = real[0][1] - real[0][0]
    assert need < bound[0]
    tile = (need + 20, 100)
    smodel = fxstream.compile(model, tile_size=tile)
    assert all(w <= t for w, t in zip(widest(smodel.shape_plan(*size)), tile))
    check_streamed(model, torch.randn(1, channels, *size, dtype=torch.float64), tile, streamed=smodel, min_tiles=2)


def test_tile_smaller_than_one_pixels_region_raises_per_input_size():
    model, channels, _ = build("unet_pad")
    smodel = fxstream.compile(model, tile_size=(40, 100))  # bounds only: compiles
    with pytest.raises(fxstream.TileSizeError, match="too small for an input of size 331x45"):
        smodel(torch.randn(1, channels, 331, 45, dtype=torch.float64))
