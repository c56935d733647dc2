"""The fast per-axis widths (``fxstream.widths``) give the same widths and splits as the
plain region walks, under both schedules; ``fxstream plan`` on 1,000,000 x 1,000,000."""

import functools
import io
import json
import random
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from dense_zoo import build as build_dense
from zoo import build as build_zoo

import fxstream
from fxstream import cli
from fxstream.cli import render
from fxstream.ops.geometry import Interval
from fxstream.planning import plan, tiling, widths

KINDS = ("recompute", "carry")
STENCIL_ZOO = [
    "conv_variety",
    "same_padding",
    "padding_modes",
    "pools",
    "pad_ops",
    "convnext_style",
    "branchy_dag",
    "classifier",
]
# transposed convolutions, pixel shuffles, resampling (also with U-Net pads and crops): no closed form
FRACTIONAL = ["unet_pad", "unet_crop", "unet_bilinear_size", "transposed_variety", "super_resolution"]


class CropNet(nn.Module):
    """Only plain stencils, with everything that clips: reflect and replicate padding, a dilated
    valid conv, a skip center-cropped by size-dependent slicing, a ceil_mode pool and a
    negative F.pad."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.b = nn.Conv2d(4, 4, 3, dilation=2)
        self.c = nn.Conv2d(4, 4, (3, 5), padding=(1, 2))
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.out = nn.Conv2d(8, 3, 3, stride=2, padding=1, padding_mode="replicate")

    def forward(self, x):
        a = F.relu(self.a(x))
        b = self.c(F.relu(self.b(a)))
        h, w = b.shape[2], b.shape[3]
        top, left = (a.shape[2] - h) // 2, (a.shape[3] - w) // 2
        y = torch.cat([b, a[:, :, top : top + h, left : left + w]], 1)
        y = F.pad(self.pool(y), (-1, -2, 0, -3))
        return self.out(F.relu(y))


class TwoOutputs(nn.Module):
    """A head reading two trunk tensors of the same size (two trunk outputs), or of strides
    2 and 4 (``strides``)."""

    def __init__(self, strides: bool = False):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2 if strides else 1, padding=1, padding_mode="reflect")
        self.c = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = self.c(F.relu(self.b(a)))
        return a.mean((2, 3))[:, :3] + b.amax((2, 3))


def _model(name: str) -> nn.Module:
    if name == "crop_net":
        return CropNet().eval()
    if name in ("two_outputs", "two_strides"):
        return TwoOutputs(strides=name == "two_strides").eval()
    if name == "resnet18_layer2":
        return torchvision.models.resnet18().eval()
    if name in FRACTIONAL:
        return build_dense(name)[0].float()
    return build_zoo(name)[0].float()


@functools.cache
def _geometry(name: str) -> plan.TrunkGeometry:
    boundary = "layer2" if name == "resnet18_layer2" else None
    return fxstream.compile(_model(name), tile_size=512, boundary=boundary).program().geometry


def _resolved(name: str, size: tuple[int, ...]) -> tuple:
    geo = plan.resolved(_geometry(name), size)
    return geo, plan.node_sizes(geo, size)


def _widths(kind: str, geo, sizes: dict, axis: int) -> tuple:
    """(plain width, fast width) of one schedule along ``axis``."""
    if kind == "recompute":
        plain = plan._axis_width(geo, sizes, axis)
        return plain, widths.recompute_width(plain, geo, sizes, axis)
    plain = functools.partial(tiling._carry_width, geo, sizes, axis)
    return plain, widths.carry_width(plain, geo, sizes, axis)


def _reference_split(width, n: int, limit: int) -> list | None:
    """``plan.fitted_split`` as it was before the fast widths, verbatim: the splits must not change."""

    def greedy(limit: int) -> list | None:
        parts, start = [], 0
        while start < n:
            if width(start, start + 1) > limit:
                return None
            lo, hi = 1, n - start
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if width(start, start + mid) <= limit else (lo, mid - 1)
            parts.append(Interval(start, start + lo))
            start += lo
        return parts

    parts = greedy(limit)
    if parts is None:
        return None
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi) // 2
        trial = greedy(mid)
        if trial is not None and len(trial) <= len(parts):
            hi = mid
        else:
            lo = mid + 1
    return greedy(lo)


def _blocks(n: int, rng: random.Random) -> list[tuple[int, int]]:
    """Every block of a short axis; else every block touching a border, and random ones."""
    if n <= 40:
        return [(lo, hi) for lo in range(n) for hi in range(lo + 1, n + 1)]
    edge = [(0, hi) for hi in range(1, n + 1)] + [(lo, n) for lo in range(n)]
    return edge + [tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(300)]


@pytest.mark.parametrize("name", STENCIL_ZOO + ["crop_net", "resnet18_layer2"])
@pytest.mark.parametrize("size", [(37, 29), (131, 97)])
def test_fast_widths_and_splits_equal_the_walk(name, size):
    if name == "resnet18_layer2":
        size = tuple(2 * s + 3 for s in size)
    geo, sizes = _resolved(name, size)
    for kind, _, plain, fast, n in _equal_widths(geo, sizes, random.Random(0)):
        full = plain(0, n)
        for limit in sorted({plain(0, 1), full // 3 + 1, full - 1}):
            assert plan.fitted_split(fast, n, limit) == _reference_split(plain, n, limit), (kind, limit)


@pytest.mark.parametrize("name", STENCIL_ZOO + ["crop_net"])
def test_the_closed_form_answers_the_interior(name):
    """On an image large against the receptive field the closed form is used (and checked by
    the guard), and the splits need only the border walks."""
    geo, sizes = _resolved(name, (331, 297))
    for kind in KINDS:
        for axis in range(2):
            plain, fast = _widths(kind, geo, sizes, axis)
            n = sizes[geo.output][axis]
            limit = plain(n // 2, n // 2 + n // 20)
            assert plan.fitted_split(fast, n, limit) == _reference_split(plain, n, limit)
            assert fast.interior is not None, (kind, axis)
            zone = fast.interior
            assert zone.lo_min <= 8 and zone.hi_max >= n - 8  # the zone is all but the borders
            walks = fast.walks
            assert fast(zone.lo_min, zone.hi_max) == plain(zone.lo_min, zone.hi_max)
            assert fast.walks == walks  # answered without a walk


@pytest.mark.parametrize("name", ["two_outputs", "two_strides"])
def test_several_trunk_outputs(name):
    """Outputs of one size have the closed form; outputs of different strides walk."""
    geo, sizes = _resolved(name, (203, 187))
    same = all(sizes[o] == sizes[geo.output] for o in geo.outputs)
    for kind, axis, plain, fast, n in _equal_widths(geo, sizes, random.Random(1)):
        assert (fast.interior is not None) == same, (kind, axis, geo.outputs)
        limit = plain(n // 2, n // 2 + n // 4)
        assert plan.fitted_split(fast, n, limit) == _reference_split(plain, n, limit)


def _equal_widths(geo, sizes, rng):
    """Per schedule and axis, after checking that the fast width equals the walk on border and
    random blocks: ``(kind, axis, plain, fast, n)``."""
    for kind in KINDS:
        for axis in range(2):
            plain, fast = _widths(kind, geo, sizes, axis)
            n = sizes[geo.output][axis]
            for lo, hi in _blocks(n, rng):
                assert fast(lo, hi) == plain(lo, hi), (kind, axis, lo, hi)
            yield kind, axis, plain, fast, n


@pytest.mark.parametrize("name", FRACTIONAL)
def test_fractional_strides_fall_back_to_the_walk(name):
    geo, sizes = _resolved(name, (181, 163))
    for kind in KINDS:
        for axis in range(2):
            plain, fast = _widths(kind, geo, sizes, axis)
            assert fast.interior is None and fast._unchecked is None, (kind, axis)
            n = sizes[geo.output][axis]
            limit = plain(n // 2, n // 2 + n // 4)
            assert plan.fitted_split(fast, n, limit) == _reference_split(plain, n, limit)


@pytest.mark.parametrize("name", ["crop_net", "pad_ops", "transposed_variety"])
@pytest.mark.parametrize("kind", KINDS)
def test_tilings_equal_those_of_the_plain_walk(monkeypatch, name, kind):
    """The whole tiling (``plan_shape``) is the same with the plain widths."""
    smodel = fxstream.compile(_model(name), tile_size=40, schedule=kind)
    program = smodel.program()
    fast = tiling.plan_shape(program.geometry, program.plan, (157, 143), program.schedule)
    monkeypatch.setattr(widths, "recompute_width", lambda plain, geo, sizes, axis: plain)
    monkeypatch.setattr(widths, "carry_width", lambda plain, geo, sizes, axis: plain)
    slow = tiling.plan_shape(program.geometry, program.plan, (157, 143), program.schedule)
    assert fast.num_tiles > 4
    assert fast.axes == slow.axes and fast.grid == slow.grid


def test_a_wrong_closed_form_is_dropped_by_the_guard():
    geo, sizes = _resolved("conv_variety", (131, 97))
    plain, fast = _widths("recompute", geo, sizes, 0)
    right = fast._unchecked
    assert right is not None
    wrong = widths.FastWidth(plain, widths.Interior(right.slope, right.offset + 1, *_zone(right)))
    n = sizes[geo.output][0]
    assert wrong(n // 3, n // 2) == plain(n // 3, n // 2)
    assert wrong.interior is None and wrong.walks > 0


def _zone(interior: widths.Interior) -> tuple:
    return interior.lo_min, interior.lo_max, interior.hi_min, interior.hi_max


def test_splits_are_shared_by_equal_axes_only():
    geo, sizes = _resolved("crop_net", (97, 97))
    keys = [widths.axis_key("recompute", geo, sizes, axis) for axis in range(2)]
    assert keys[0] != keys[1]  # the negative pad differs between the axes
    square = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, stride=2)).eval()
    geo = fxstream.compile(square, tile_size=32).program().geometry
    sizes = plan.node_sizes(geo, (91, 91))
    keys = [widths.axis_key("recompute", geo, sizes, axis) for axis in range(2)]
    assert keys[0] == keys[1] != widths.axis_key("carry", geo, sizes, 0)
    assert keys[0] != widths.axis_key("recompute", geo, plan.node_sizes(geo, (93, 91)), 0)
    calls = []
    first = widths.cached_split(_Keyed(keys[0]), 45, 20, lambda: calls.append(1) or [1, 2])
    again = widths.cached_split(_Keyed(keys[1]), 45, 20, lambda: calls.append(1) or [3])
    other = widths.cached_split(_Keyed(keys[1]), 45, 21, lambda: calls.append(1) or [4])
    assert first == again == [1, 2] and other == [4] and len(calls) == 2
    again.append(5)  # callers get copies
    assert widths.cached_split(_Keyed(keys[0]), 45, 20, lambda: [6]) == [1, 2]
    assert widths.cached_split(lambda lo, hi: 0, 45, 20, lambda: [7]) == [7]  # no key: not cached


class _Keyed:
    def __init__(self, key):
        self.key = key


def _longest(fits, most: int, guess: int) -> int:
    """The largest ``length`` in ``[1, most]`` with ``fits(length)``, for a monotone ``fits``:
    galloping from ``guess`` (two probes when the guess is right), then bisection."""
    good, bad, step = 0, most + 1, 1  # fits(good) (or good == 0), and not fits(bad) (or bad == most + 1)
    probe = max(1, min(guess, most))
    while bad - good > 1:
        if fits(probe):
            good, probe = probe, probe + step
        else:
            bad, probe = probe, probe - step
        step *= 2
        if not good < probe < bad:
            probe = (good + bad) // 2
    return good


def _greedy_cuts(width, n: int, limit: int) -> list[int]:
    """Block boundaries of the fewest blocks whose widths fit ``limit``: from the left, each
    block as long as it fits, its search starting at the previous block's length (an
    implementation independent of ``plan.fitted_split``)."""
    cuts, length = [0], 1
    while cuts[-1] < n:
        start = cuts[-1]
        length = _longest(lambda k, s=start: width(s, s + k) <= limit, n - start, length)
        cuts.append(start + length)
    return cuts


@pytest.mark.parametrize("kind", KINDS)
def test_plan_of_a_million_by_a_million_resnet18(kind):
    out = io.StringIO()
    args = ["plan", "resnet18", "--input-shape", "1,3,1000000,1000000", "--tile-size", "4096"]
    with redirect_stdout(out):
        assert cli.main(args + ["--schedule", kind, "--format", "json"]) == 0
    report = json.loads(out.getvalue())
    program = fxstream.compile(torchvision.models.resnet18().eval(), tile_size=4096, schedule=kind).program()
    geo, size = program.geometry, (1_000_000, 1_000_000)
    sizes = plan.node_sizes(geo, size)
    n = sizes[geo.output][0]
    if kind == "recompute":

        def width(lo: int, hi: int) -> int:  # the tiles' own walk (tiling._walk), not plan._regions
            region = tiling._walk(geo, sizes, 0, (lo, hi))[0][geo.image]
            return region.hi - region.lo

        count = len(_greedy_cuts(width, n, 4096)) - 1
    else:
        cuts = _greedy_cuts(functools.partial(tiling._carry_width, geo, sizes, 0), n, 4096)
        count = len(tiling._drop_empty(geo, sizes, 0, cuts)) - 1
    assert report["grid"] == [count, count]
    assert report["num_tiles"] == count * count
    assert count > 200


@pytest.mark.parametrize("most", [4, 10_000])
def test_png_draws_from_the_axes_without_cutting_every_tile(monkeypatch, tmp_path, most):
    monkeypatch.setattr(render, "MAX_DRAWN_TILES", most)  # 4: block boundaries as lines
    smodel = fxstream.compile(CropNet().eval(), tile_size=40)
    program = smodel.program()
    shape = tiling.plan_shape(program.geometry, program.plan, (157, 143), program.schedule)
    assert 4 < shape.num_tiles < 10_000
    path = tmp_path / "tiles.png"
    render.png(shape, program.plan, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "tiles" not in shape.__dict__  # ShapePlan.tiles (one Tile per tile) was never built
