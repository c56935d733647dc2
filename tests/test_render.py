"""The plan picture (``fxstream plan --png``, :mod:`fxstream.cli.render`): the rectangles it
draws for the highlighted tile are true for the schedule, and the picture has its legend, the
tile-size label, the predicted peaks of the text report and the caption on cells and stripes.

Geometry on the hand-computed DAG of tests/test_cli.py (receptive field 16, stride 2, halo
(7, 7)) on a 300x200 input with tile 64: the receptive field drawn is checked against the
gradient footprint of the block (an oracle independent of the planner), the region read
against the runtime's tile (``ShapePlan.tile``), and under each schedule the containments the
legend claims.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_cli import HandDAG

import fxstream
from fxstream.cli import render, report
from fxstream.memory.units import format_bytes
from fxstream.planning.schedule import Schedule

pytest.importorskip("matplotlib")

SIZE = (300, 200)
TILE = 64
SCHEDULES = {
    "carry": "carry",
    "recompute": "recompute",
    "banded": Schedule("carry", stripes="banded", band_rows=2),
}


def planned(schedule):
    smodel = fxstream.compile(HandDAG(), TILE, schedule=schedule)
    return smodel, smodel.shape_plan(*SIZE), smodel.program().plan


def every_tile(shape):
    return [(i, j) for i in range(shape.grid[0]) for j in range(shape.grid[1])]


def footprint(block: render.Box) -> render.Box:
    """The input pixels the trunk output over ``block`` (image pixels, stride 2) depends on:
    the bounding box of the nonzero input gradient. Positive weights and inputs keep every
    ReLU active and tanh' > 0, so no gradient vanishes by chance."""
    model = HandDAG().double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 + 0.01 * torch.rand_like(p))
    x = torch.rand(1, 3, *SIZE, dtype=torch.float64, requires_grad=True)
    a = F.relu(model.a(x))
    y = model.out(torch.tanh(model.b1(a) + model.b2(model.pool(a))))  # the trunk (boundary 'out')
    (y0, y1), (x0, x1) = block.y, block.x
    y[..., y0 // 2 : y1 // 2, x0 // 2 : x1 // 2].sum().backward()
    rows, cols = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    return render.Box((int(rows.min()), int(rows.max()) + 1), (int(cols.min()), int(cols.max()) + 1))


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_drawn_rectangles_are_true_for_the_schedule(name):
    _, shape, plan = planned(SCHEDULES[name])
    assert shape.grid[0] >= 3 and shape.grid[1] >= 3
    for index in every_tile(shape):
        tile = render.highlight(shape, plan, index)
        # the region drawn is the region the runtime's tile reads from the input
        assert (tile.region.y, tile.region.x) == shape.tile(index).region, index
        if not tile.band_start:  # the tile size bounds what a tile reads (the caption says so)
            assert max(tile.region.size) <= TILE, index
        assert tile.field.contains(tile.block) and tile.field.contains(tile.region), index
        interior = all(0 < k < n - 1 for k, n in zip(index, shape.grid))
        if name == "recompute":  # block + halo
            assert tile.region.contains(tile.block) and tile.region == tile.field, index
        elif interior and not tile.band_start:  # the input cell, skewed right and down of the block
            assert not tile.region.contains(tile.block), index
            assert tile.region.y[0] > tile.block.y[0] and tile.region.x[0] > tile.block.x[0], index
            assert tile.region.y[1] == tile.field.y[1] and tile.region.x[1] == tile.field.x[1], index
        if tile.band_start:  # a band's first row reads its receptive field along the rows
            assert name == "banded" and tile.region.y == tile.field.y, index
    assert ("except in the first tile row of a band" in render.caption(shape.schedule)) == (name == "banded")


def test_carry_regions_cover_the_image():
    """Under carry the shaded input regions (input cells and the first op's halo) cover the
    image: consecutive tiles' regions meet or overlap along each axis."""
    _, shape, _ = planned("carry")
    for axis, n in enumerate(SIZE):
        regions = [dict(part.computed)[""] for part in shape.axes[axis]]
        assert regions[0][0] == 0 and regions[-1][1] == n
        assert all(b[0] <= a[1] < b[1] for a, b in zip(regions, regions[1:])), regions


@pytest.mark.parametrize("index", [(2, 2), (0, 0), (4, 3)])
def test_receptive_field_is_the_gradient_footprint(index):
    _, shape, plan = planned("carry")
    tile = render.highlight(shape, plan, index)
    assert tile.field == footprint(tile.block)


def test_highlight_skips_a_band_start():
    _, shape, plan = planned(SCHEDULES["banded"])  # 5 rows, bands start at rows 0, 2, 4
    assert shape.grid[0] == 5 and render.highlight(shape, plan).index[0] == 3
    _, shape, plan = planned(Schedule("carry", stripes="banded", band_rows=1))  # every row starts a band
    tile = render.highlight(shape, plan)
    assert tile.band_start and tile.region.y == tile.field.y


def _patch(ax, label: str):
    (patch,) = [p for p in ax.patches if p.get_label() == label]
    (x0, y0), (x1, y1) = patch.get_bbox().get_points()
    return render.Box((round(y0), round(y1)), (round(x0), round(x1)))


@pytest.mark.parametrize("name", ["carry", "recompute"])
def test_picture_has_legend_labels_and_peaks(name):
    smodel, shape, plan = planned(SCHEDULES[name])
    data = report.build(smodel, (1, 3, *SIZE), torch.float32, model_name="hand")
    fig = render.figure(shape, plan, "hand", data)
    try:
        ax = fig.axes[0]
        tile = render.highlight(shape, plan)
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "highlighted tile: its block" in legend
        read = [label for label in legend if label.startswith("highlighted tile: the input it reads")]
        assert len(read) == 1
        # the rectangles drawn are the highlight's
        assert _patch(ax, "highlighted tile: its block") == tile.block
        assert _patch(ax, read[0]) == tile.region
        texts = [t.get_text() for t in fig.texts] + [t.get_text() for t in ax.texts]
        height, width = tile.region.size  # height first, as in --input-shape and --tile-size
        assert f"reads {height}x{width} px (tile size 64x64)" in texts
        peaks = "\n".join(render.peak_lines(data))
        assert peaks in texts
        memory = data["memory"]
        for value in (memory["streamed"]["training"], memory["plain"]["training"]):
            assert format_bytes(value["bytes"]) in peaks
        assert format_bytes(memory["streamed"]["training"]["device_bytes"]) in peaks  # --device cuda: split
        caption = " ".join(t.replace("\n", " ") for t in texts)
        if name == "carry":
            assert "block + halo" not in read[0]
            assert _patch(ax, legend[-1]) == tile.field and "stripes" in legend[-1]
            assert "cut into cells" in caption and "(stripes)" in caption
        else:
            assert "block + halo" in read[0] and not any("stripes" in label for label in legend)
            assert "whole receptive field" in caption
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_picture_of_many_tiles_draws_grid_lines(monkeypatch):
    monkeypatch.setattr(render, "MAX_DRAWN_TILES", 4)
    _, shape, plan = planned("carry")
    fig = render.figure(shape, plan)
    try:
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        assert not any("shaded" in label for label in legend)
        assert len(fig.axes[0].collections) == 2  # the block boundaries, per axis
        assert _patch(fig.axes[0], "highlighted tile: its block") == render.highlight(shape, plan).block
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
