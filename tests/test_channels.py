"""Channel-only ops (split, chunk, unbind, channel shuffle, views that regroup channels)
stream exactly; views that touch a spatial dim are still rejected."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from exactness import check_streamed

import fxstream

pytestmark = pytest.mark.usefixtures("uniform_tiles")


def conv(cin: int, cout: int, k: int = 3) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class SplitBlock(nn.Module):
    """Res2Net/CSP-style: split the channels, convolve the pieces, concatenate."""

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem = conv(3, 8)
        self.a, self.b = conv(4, 4), conv(4, 4)

    def forward(self, x):
        y = self.stem(x)
        if self.form == "torch.split":
            p, q = torch.split(y, [4, 4], dim=1)
        elif self.form == "Tensor.split":
            parts = y.split(4, 1)
            p, q = parts[0], parts[-1]
        elif self.form == "chunk":
            p, q = y.chunk(2, dim=1)
        else:  # tensor_split
            p, q = torch.tensor_split(y, 2, dim=1)
        return torch.cat([self.a(p), self.b(q) + p], dim=1)


class UnbindBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 6)
        self.head = conv(2, 2)

    def forward(self, x):
        y = self.stem(x).unflatten(1, (3, 2))  # (n, 3, 2, h, w)
        a, b, c = y.unbind(1)
        return self.head(a * b + c)


def channel_shuffle(x: torch.Tensor, groups: int, form: str) -> torch.Tensor:
    """torchvision shufflenet_v2's channel shuffle, with the sizes read in several forms."""
    if form == "unpack":
        n, c, h, w = x.size()
    elif form == "size_i":
        n, c, h, w = x.size(0), x.size(1), x.size(2), x.size(3)
    else:
        n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, -1, h, w)


class ShuffleBlock(nn.Module):
    """ShuffleNetV2 unit: chunk, branch, concat, shuffle."""

    def __init__(self, form: str = "unpack", module: bool = False):
        super().__init__()
        self.form, self.module = form, module
        self.stem = conv(3, 8)
        self.branch = nn.Sequential(conv(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, groups=4), conv(4, 4, 1))
        self.shuffle = nn.ChannelShuffle(2)
        self.out = conv(8, 5)

    def forward(self, x):
        y = self.stem(x)
        a, b = y.chunk(2, dim=1)
        y = torch.cat((a, self.branch(b)), dim=1)
        y = self.shuffle(y) if self.module else channel_shuffle(y, 2, self.form)
        return self.out(y)


def build(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return model.double().eval()


@pytest.mark.parametrize("form", ["torch.split", "Tensor.split", "chunk", "tensor_split"])
def test_split_along_channels_is_exact(form):
    model = build(SplitBlock(form))
    check_streamed(model, torch.randn(2, 3, 37, 29, dtype=torch.float64), 16, min_tiles=4)


def test_unbind_and_unflatten_along_channels_are_exact():
    model = build(UnbindBlock())
    check_streamed(model, torch.randn(1, 3, 31, 26, dtype=torch.float64), 14, min_tiles=4)


@pytest.mark.parametrize("form", ["unpack", "size_i", "shape_i"])
def test_shufflenet_channel_shuffle_is_exact(form):
    model = build(ShuffleBlock(form))
    smodel = fxstream.compile(model, tile_size=16)
    assert "regroup" in smodel.streamed_trunk.tile.code
    check_streamed(model, torch.randn(2, 3, 35, 27, dtype=torch.float64), 16, streamed=smodel, min_tiles=4)


def test_channel_shuffle_module_is_exact():
    model = build(ShuffleBlock(module=True))
    check_streamed(model, torch.randn(1, 3, 35, 27, dtype=torch.float64), 16, min_tiles=4)


class BadView(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.stem = conv(3, 4)
        self.out = conv(4, 4)

    def forward(self, x):
        y = self.stem(x)
        n, c, h, w = y.size()
        if self.form == "split_height":  # moves half the rows into a new dim
            y = y.view(n, c, h // 2, 2, w).sum(3).repeat_interleave(2, dim=2)
        elif self.form == "swap":  # reinterprets (h, w) as (w, h)
            y = y.reshape(n, c, w, h).transpose(2, 3)
        elif self.form == "mix":  # channels and rows in one dim
            y = y.reshape(n, c * h, w).view(n, c, h, w)
        elif self.form == "channels_after":  # elements move between channels and pixels
            y = y.reshape(n, 1, h, w, c).squeeze(1).permute(0, 3, 1, 2)
        else:  # a split along a spatial dim
            a, b = y.chunk(2, dim=3)
            y = torch.cat([b, a], dim=3)
        return self.out(y)


@pytest.mark.parametrize("form", ["split_height", "swap", "mix", "channels_after", "spatial_chunk"])
def test_views_touching_spatial_dims_are_rejected(form):
    model = build(BadView(form))
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=16)
    assert info.value.node  # names the node
    reason = "cuts the image" if form == "spatial_chunk" else "reshapes spatial dims"
    assert reason in str(info.value)
