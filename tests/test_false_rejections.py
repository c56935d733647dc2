"""Local ops that fxstream used to reject, and now streams exactly (issue 20, issue 19 item 9).

Each small net holds one such op between convolutions; float64 outputs, every parameter
gradient and the input gradient match the plain model on several tiles, under both
schedules. Variants of each op that are not local stay rejected, with the usual lines.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from exactness import check_streamed

import fxstream
from fxstream.analysis.analyze import analyze
from fxstream.frontend.tracecheck import check_trace

pytestmark = pytest.mark.usefixtures("uniform_tiles", "schedule")
CARRY_SPLIT = fxstream.planning.tiling.carry_split  # before the schedule fixture replaces it


def conv(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2)


def build(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double().eval()


def image(*size: int, batch: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, *size, dtype=torch.float64)


def rejected(model: nn.Module, *words: str, tile_size: int = 16) -> fxstream.UnsupportedOpError:
    """The compile error, which names the node, the module, the source line and the fix."""
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=tile_size)
    message = str(info.value)
    assert info.value.node and "\n  node '" in message and "\n  fix: " in message, message
    assert all(word in message for word in words), message
    return info.value


# --- channel slicing: x[:, a:b] (timm dpn68, ghostnet, rexnet) ----------------------------


class ChannelSlices(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem = conv(3, 6)
        self.a, self.b = conv(3, 4), conv(2, 4)
        self.tail = conv(4, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if self.form == "dpn":  # x_s[:, :n] and x_s[:, n:]
            out = self.a(y[:, :3]) + self.b(y[:, 4:])
        elif self.form == "ghost":  # out[:, :k, :, :]
            out = self.a(torch.cat([y, y], 1)[:, 2:5, :, :])
        elif self.form == "rexnet":  # cat([x[:, 0:c] + shortcut, x[:, c:]])
            out = self.a(torch.cat([y[:, 0:3] + x, y[:, 3:]], dim=1)[:, 1:4])
        elif self.form == "index":  # an integer index drops the channel dim, None adds one back
            out = self.a(y[:, 1:4]) * y[:, -1][:, None]
        elif self.form == "ellipsis":
            out = self.a(y[:, ::2, ...])
        elif self.form == "batch":
            out = self.a(y[1:, 2:5])
        elif self.form == "with_crop":  # channels and a spatial crop in one index
            out = self.a(y[:, 1:4, 1:-1, 2:])
        else:  # channels last: the slice is on the last dim
            out = self.a(y.permute(0, 2, 3, 1)[..., -3:].permute(0, 3, 1, 2))
        return self.tail(torch.relu(out))


@pytest.mark.parametrize("form", ["dpn", "ghost", "rexnet", "index", "ellipsis", "batch", "with_crop", "channels_last"])
def test_channel_slicing_is_exact(form):
    model = build(ChannelSlices(form))
    smodel = fxstream.compile(model, tile_size=14)
    # a slice of batch/channel dims only is local: nothing to evaluate per input size
    assert bool(smodel.program().analysis.dynamic) == (form == "with_crop")
    check_streamed(model, image(37, 29, batch=2), 14, streamed=smodel, min_tiles=4)


class SpatialIndex(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem, self.tail = conv(3, 4), conv(4, 4)

    def forward(self, x):
        y = self.stem(x)
        if self.form == "int":  # one row of the image, broadcast over every row
            y = y + y[:, :, 3].unsqueeze(2)
        else:  # a list index along a spatial dim
            y = y[:, :, [2, 0, 1]]
        return self.tail(y)


@pytest.mark.parametrize("form", ["int", "list"])
def test_spatial_indexing_stays_rejected(form):
    rejected(build(SpatialIndex(form)))


# --- strided spatial slices: y[:, :, ::2, ::2] (issue 19, item 9) ----------------------


class StridedSlice(nn.Module):
    """A strided slice is a stride-s window of extent 1; here it also meets a stride-2 conv."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem, self.down, self.tail = conv(3, 4), conv(4, 4, stride=2), conv(4, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if self.form == "every_other":
            y = self.down(y) + y[:, :, ::2, ::2]
        elif self.form == "offsets":  # odd rows, every third column
            y = y[:, :, 1::2, ::3]
        elif self.form == "crop":  # a crop and a stride in one slice
            y = y[:, :, 1:-1:2, 2:]
        else:  # channel slices too
            y = torch.cat([y[:, 1:, 1::2, :-1:2], y[:, :1, 1::2, :-1:2]], 1)
        return self.tail(y)


STRIDES = {"every_other": (2, 2), "offsets": (2, 3), "crop": (2, 1), "with_channels": (2, 2)}


@pytest.mark.parametrize("form", sorted(STRIDES))
def test_strided_slice_is_a_window(form):
    model = build(StridedSlice(form))
    smodel = fxstream.compile(model, tile_size=16)
    assert smodel.plan.stride == STRIDES[form]
    for size in [(37, 29), (40, 33)]:
        check_streamed(model, image(*size), 16, streamed=smodel, min_tiles=4)


# --- Tensor.repeat over channels (MONAI VNet) ------------------------------------------


class Repeat(nn.Module):
    def __init__(self, form: str, ndim: int = 2):
        super().__init__()
        self.form = form
        Conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        self.stem, self.tail = Conv(3, 2, 3, padding=1), Conv(8, 3, 3, padding=1)
        self.ndim = ndim

    def forward(self, x):
        y = torch.relu(self.stem(x))
        if self.form == "vnet":  # x.repeat([1, n, 1, 1, 1][: spatial_dims + 2]) + conv(x)
            y = torch.relu(self.stem(x).repeat(1, 4, *([1] * self.ndim)) + y.repeat([1, 4, 1, 1, 1][: self.ndim + 2]))
        elif self.form == "leading":  # a new leading dim, reduced again
            y = y.repeat(3, 1, 4, 1, 1).sum(0)
        else:
            y = y.repeat_interleave(4, dim=1)
        return self.tail(y)


@pytest.mark.parametrize("form", ["vnet", "leading", "interleave"])
def test_channel_repeat_is_exact(form):
    check_streamed(build(Repeat(form)), image(37, 29, batch=2), 14, min_tiles=4)


def test_channel_repeat_is_exact_in_3d():
    check_streamed(build(Repeat("vnet", ndim=3)), image(13, 11, 10), 8, min_tiles=4)


class SpatialRepeat(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem, self.tail = conv(3, 4), conv(4, 4)

    def forward(self, x):
        y = self.stem(x)
        y = y.repeat(1, 1, 2, 1) if self.form == "repeat" else y.repeat_interleave(2, dim=-1)
        return self.tail(y)


@pytest.mark.parametrize("form", ["repeat", "interleave"])
def test_spatial_repeat_stays_rejected(form):
    rejected(build(SpatialRepeat(form)), "spatial")


# --- torch.stack, then a reduction over the new dim (timm skresnet, smp FPN) --------------


class Stack(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.a, self.b, self.c = conv(3, 4), conv(3, 4, 5), conv(3, 4, 1)
        self.weight = nn.Parameter(torch.randn(1, 3, 4, 1, 1))
        self.tail = conv(4, 3)

    def forward(self, x):
        paths = [torch.relu(self.a(x)), self.b(x), self.c(x)]
        if self.form == "selective_kernel":  # stack at dim 1, a per-path weight, sum over paths
            y = (torch.stack(paths, dim=1) * self.weight.softmax(1)).sum(dim=1)
        elif self.form == "fpn_merge":  # torch.stack(x).sum(dim=0)
            y = torch.stack(paths).sum(dim=0)
        elif self.form == "last":  # the new dim after the spatial dims
            y = torch.stack(paths, dim=-1).amax(-1)
        else:  # between channels and space, kept through a conv-free op
            y = torch.relu(torch.stack(paths, 2)).mean(2)
        return self.tail(y)


@pytest.mark.parametrize("form", ["selective_kernel", "fpn_merge", "last", "middle"])
def test_stack_and_reduce_is_exact(form):
    check_streamed(build(Stack(form)), image(37, 29, batch=2), 16, min_tiles=4)


# --- space-to-depth written as view/permute/view (timm tresnet) -------------------------


class SpaceToDepth(nn.Module):
    """``x.view(N, C, H // b, b, W // b, b).permute(order).view(N, C * b * b, H // b, W // b)``."""

    def __init__(self, block: int, order: tuple[int, ...], form: str = "size"):
        super().__init__()
        self.block, self.order, self.form = block, order, form

    def forward(self, x):
        b = self.block
        if self.form == "size":
            N, C, H, W = x.size()
        else:
            N, C, H, W = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        x = x.view(N, C, H // b, b, W // b, b)
        x = x.permute(*self.order).contiguous()
        return x.view(N, C * b * b, H // b, W // b)


class S2DNet(nn.Module):
    def __init__(self, s2d: nn.Module, block: int):
        super().__init__()
        self.stem, self.s2d, self.tail = conv(3, 2), s2d, conv(2 * block * block, 3)

    def forward(self, x):
        return self.tail(self.s2d(torch.relu(self.stem(x))))


def timm_space_to_depth():
    from timm.layers import SpaceToDepth as TimmSpaceToDepth

    return TimmSpaceToDepth(4)


S2D = {
    "timm": (timm_space_to_depth, 4),  # order (0, 3, 5, 1, 2, 4): channels (i, j, c)
    "pixel_unshuffle_order": (lambda: SpaceToDepth(2, (0, 1, 3, 5, 2, 4), "shape"), 2),  # (c, i, j)
    "columns_first": (lambda: SpaceToDepth(3, (0, 5, 1, 3, 2, 4)), 3),  # (j, c, i)
}


@pytest.mark.parametrize("name", sorted(S2D))
def test_space_to_depth_is_a_window(name):
    factory, block = S2D[name]
    model = build(S2DNet(factory(), block))
    smodel = fxstream.compile(model, tile_size=24)
    assert smodel.plan.stride == (block, block)
    size = (block * 13, block * 11)
    check_streamed(model, image(*size, batch=2), 24, streamed=smodel, min_tiles=4)


class BlockShuffle(nn.Module):
    """Pixels move within 2x2 blocks (rows and columns of a block swapped): not space-to-depth."""

    def forward(self, x):
        N, C, H, W = x.size()
        return x.view(N, C, H // 2, 2, W // 2, 2).permute(0, 1, 2, 5, 4, 3).reshape(N, C, H, W)


def test_other_block_views_stay_rejected():
    rejected(build(S2DNet(BlockShuffle(), 1)), "reshapes spatial dims")


# --- suggestions that compile -----------------------------------------------------------


class HeadReadsSizes(nn.Module):
    """The head reads the batch and channel sizes of a trunk tensor it does not otherwise use
    (resnest's split attention: ``B, RC, H, W = x.shape`` before the global pooling)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = conv(3, 4), conv(4, 6, stride=2)

    def forward(self, x):
        a = torch.relu(self.a(x))
        y = self.b(a)
        n, c = a.shape[0], a.size(1)
        return y.mean((2, 3)).reshape(n, 3, 2) / c


def test_head_reading_sizes_of_a_trunk_tensor_streams():
    model = build(HeadReadsSizes())
    smodel = fxstream.compile(model, tile_size=16)
    assert set(smodel.program().geometry.outputs) == {"relu", "b"}  # the sizes come from the assembled map
    check_streamed(model, image(37, 29, batch=2), 16, streamed=smodel, min_tiles=4)


class PyramidWithNormedBranch(nn.Module):
    """FPN-like: a top-down pyramid, then a per-level block whose GroupNorm is global. The
    first level's block is computed before the pyramid's last level (smp FPN's order)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = conv(3, 4, stride=2), conv(4, 4, stride=2)
        self.lat = conv(4, 4, 1)
        self.seg2, self.seg1 = conv(4, 4), conv(4, 4)
        self.norm = nn.GroupNorm(2, 4)

    def forward(self, x):
        c1 = torch.relu(self.c1(x))
        p2 = torch.relu(self.c2(c1))
        p1 = nn.functional.interpolate(p2, scale_factor=2.0) + self.lat(c1)
        s2 = self.norm(self.seg2(p2))  # rejected here; p1 streams
        return nn.functional.interpolate(s2, scale_factor=2.0) + self.seg1(p1)


def test_largest_prefix_streams_past_a_sibling_branch():
    """The prefix may end after a classified node outside it that reads it (seg2's conv reads
    p2): that reader runs after the prefix's end, in the head."""
    model = build(PyramidWithNormedBranch())
    error = rejected(model, "global norm:")
    assert error.boundary == "add"  # p1: the whole pyramid
    smodel = fxstream.compile(model, tile_size=24, boundary=error.boundary)
    assert set(smodel.program().geometry.outputs) == {"relu_1", "add"}
    assert "it also streams 'relu_1', which the rest reads" in str(error)
    check_streamed(model, image(44, 36), 24, streamed=smodel, min_tiles=4)


# --- trace gaps: tensors made from sizes, torch.as_tensor, channel padding --------------------


class ZeroPadShortcut(nn.Module):
    """MONAI ResNet's type-A shortcut: ``torch.zeros(out.size(0), c, *out.shape[2:])`` next to
    ``out.data`` (which stops the shortcut's gradient)."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem, self.pool, self.tail = conv(3, 4), nn.AvgPool2d(1, 2), conv(6, 3)

    def forward(self, x):
        out = self.pool(torch.relu(self.stem(x)))
        if self.form == "star":
            pads = torch.zeros(out.size(0), 2, *out.shape[2:], dtype=out.dtype, device=out.device)
        elif self.form == "list":
            pads = torch.ones([out.shape[0], 2, out.shape[2], out.shape[3]], dtype=out.dtype) * 0.5
        else:
            pads = out.new_full((out.size(0), 2, out.size(2), out.size(3)), 2.0)
        shortcut = torch.cat([out.data if self.form == "star" else out.detach(), pads], dim=1)
        return self.tail(shortcut) + self.tail(torch.cat([out, out[:, :2]], 1))


@pytest.mark.parametrize("form", ["star", "list", "new_full"])
def test_tensors_made_from_sizes_are_local(form):
    model = build(ZeroPadShortcut(form))
    check_streamed(model, image(37, 29, batch=2), 16, min_tiles=4)


class AsTensorAndChannelPad(nn.Module):
    """MONAI HighResNet: ``x_conv + torch.as_tensor(self.chn_pad(x))`` with ChannelPad's
    ``F.pad`` of the channel dim."""

    def __init__(self):
        super().__init__()
        self.stem, self.conv, self.tail = conv(3, 2), conv(2, 5), conv(5, 3)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        pad = nn.functional.pad(y, [0, 0, 0, 0, 1, 2])
        return self.tail(self.conv(y) + torch.as_tensor(pad))


def test_as_tensor_and_channel_padding_are_local():
    check_streamed(build(AsTensorAndChannelPad()), image(37, 29), 16, min_tiles=4)


class EmptyFeature(nn.Module):
    """smp's mix-transformer encoder: ``torch.empty([B, 0, H // 2, W // 2])`` as a placeholder
    feature, and its decoder's ``features[1].size(1) == 0`` branch (in the head)."""

    def __init__(self):
        super().__init__()
        self.stem, self.proj = conv(3, 4, stride=2), nn.Linear(4, 2)

    def forward(self, x):
        batch, _, height, width = x.shape
        dummy = torch.empty([batch, 0, height // 2, width // 2], dtype=x.dtype, device=x.device)
        features = [torch.relu(self.stem(x)), dummy]
        pooled = features[0].mean((2, 3))
        if features[1].size(1) == 0:  # traced with concrete sizes: a guard in the head
            return self.proj(pooled)
        return self.proj(pooled.flip(1))


def test_guard_on_a_tensor_made_from_sizes_runs_in_the_head():
    model = build(EmptyFeature())
    smodel = fxstream.compile(model, tile_size=16)
    check_streamed(model, image(37, 29, batch=3), 16, streamed=smodel, min_tiles=4)
    assert "size_guard" in smodel.code.split("# per-tile module")[0]  # checked on every call


# --- messages --------------------------------------------------------------------------------


class UnknownThenGlobal(nn.Module):
    """An op the table does not know (local, in fact), then a squeeze-excitation further on."""

    def __init__(self, excite: bool):
        super().__init__()
        self.excite = excite
        self.stem, self.fc, self.tail = conv(3, 4), nn.Conv2d(4, 4, 1), conv(4, 4)

    def forward(self, x):
        y = torch.sinh(self.stem(x))
        if self.excite:
            y = y * torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.tail(y)


def test_unknown_op_does_not_hide_the_global_op_further_on():
    error = rejected(build(UnknownThenGlobal(excite=True)), "does not know whether function torch.sinh is local")
    message = str(error)
    assert error.node == "sinh" and error.boundary == "stem"
    further = message.split("further on")[1]
    assert "squeeze-excitation:" in further and "node 'mul'" in further, message


def test_unknown_op_alone_says_nothing_further():
    error = rejected(build(UnknownThenGlobal(excite=False)), "torch.sinh")
    assert "further on" not in str(error) and error.boundary == "stem"


def test_carry_tile_size_error_advises_the_tile_that_works(monkeypatch):
    """Under carry a tile reads its cell, not its whole cone: tiles smaller than the
    receptive field work. The error states the smallest one for this input size, exactly."""
    monkeypatch.setattr(fxstream.planning.tiling, "carry_split", CARRY_SPLIT)  # the real split
    torch.manual_seed(0)
    model = nn.Sequential(conv(3, 4, 7, stride=2), nn.ReLU(), conv(4, 4, 5, stride=2), conv(4, 4, 3)).double()
    size = (90, 77)
    with pytest.raises(fxstream.TileSizeError) as info:
        fxstream.compile(model, tile_size=4, schedule="carry").shape_plan(*size)
    minimum = info.value.minimum
    plan = fxstream.compile(model, tile_size=64, schedule="carry").plan
    assert all(m < r for m, r in zip(minimum, plan.receptive_field)), (minimum, plan.receptive_field)
    assert f"at least {minimum[0]}x{minimum[1]}" in str(info.value)
    smodel = fxstream.compile(model, tile_size=minimum, schedule="carry")
    check_streamed(model, image(*size), minimum, streamed=smodel)
    for axis in range(2):  # one pixel less along either axis does not fit
        smaller = tuple(m - (a == axis) for a, m in enumerate(minimum))
        with pytest.raises(fxstream.TileSizeError):
            fxstream.compile(model, tile_size=smaller, schedule="carry").shape_plan(*size)


# --- the trace's sample size: timm vgg's head branches on the feature map's size -----------


def small_vgg():
    """timm's VGG (stride 32) with few channels: its ConvMlp head pools the features to 7x7
    only when they are smaller, i.e. for images under 224 pixels."""
    from timm.models.vgg import VGG

    torch.manual_seed(0)
    return VGG([4, "M", 4, "M", 8, "M", 8, "M", 8, "M"], num_classes=3, mlp_ratio=1 / 512).double().eval()


def test_another_branch_is_traced_again_before_any_tile_runs():
    """Traced on the 64-pixel probe, the compiled module meets another branch at 224 pixels:
    the size guard (a BranchError, an InputShapeError that says where) stops the call before
    any tile runs, and the module traces again at that size and returns the model's output."""
    model = small_vgg()
    probe_program = fxstream.compile(model, tile_size=300).streamed_trunk  # traced on the probe
    with pytest.raises(fxstream.BranchError, match="vgg.py") as info:
        probe_program.shape_plan((224, 224))
    assert isinstance(info.value, fxstream.InputShapeError) and "vgg.py" in info.value.where
    smodel = fxstream.compile(model, tile_size=300)
    x = image(224, 224)
    with torch.no_grad():
        torch.testing.assert_close(smodel(x), model(x), rtol=1e-12, atol=1e-14)
    assert smodel.last_stats.forward_tiles == smodel.shape_plan(224, 224).num_tiles  # none in the stopped call


def test_trace_at_a_real_size_takes_its_branch():
    """A meta-device sample of a real size (no memory, no compute) traces the branch of that
    size: no pooling to 7x7 at 256 pixels, so the head's convolutions stream too."""
    model = small_vgg()
    sample = torch.empty(1, 3, 256, 256, dtype=torch.float64, device="meta")
    gm = fxstream.trace(model, sample)
    assert not any(n.target is nn.functional.adaptive_avg_pool2d for n in gm.graph.nodes)
    x = image(256, 256)
    torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    analysis = analyze(gm)
    assert {"pre_logits_fc1", "pre_logits_fc2"} <= {n.name for n in analysis.trunk}
    # the trace check runs both on the meta sample (parameters on meta too): shapes compared
    expected = check_trace(model, gm, sample)
    assert expected is not None and expected.shape == (1, 3) and expected.device.type == "meta"


def test_vgg_head_streams_at_every_size_it_meets():
    """The first call at a size that branches otherwise traces again at that size: 320 pixels
    (no pooling: the head's 7x7 convolution streams too) and 160 (the probe's branch) stream
    exactly, one after the other."""
    model = small_vgg()
    smodel = fxstream.compile(model, tile_size=300)
    for size, tiles in [((320, 320), 2), ((352, 336), 2), ((160, 160), 1)]:
        smodel(image(*size))  # the first call at a size of another branch traces it
        check_streamed(model, image(*size), 300, streamed=smodel, min_tiles=tiles)
