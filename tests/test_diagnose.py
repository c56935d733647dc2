"""Rejections name the category of the non-local op and the largest streamable prefix,
and that prefix, passed as boundary=, streams exactly."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed

import fxstream

pytestmark = pytest.mark.usefixtures("uniform_tiles")


class SE(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 2, 1), nn.Conv2d(2, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm, channels last."""

    def __init__(self, c: int):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.zeros(c)), nn.Parameter(torch.zeros(c))

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        gx = x.norm(p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return (x + self.bias + self.weight * (x * nx)).permute(0, 3, 1, 2)


class NonLocal(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.q, self.k = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        n, c, h, w = x.shape
        q, k = self.q(x).flatten(2), self.k(x).flatten(2)
        attn = torch.softmax(q.transpose(1, 2) @ k, dim=-1)
        return x + (k @ attn.transpose(1, 2)).view(n, c, h, w)


class ImagePool(nn.Module):
    """ASPP's image-pooling branch."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 1)

        self.project = nn.Conv2d(2 * c, c, 1)

    def forward(self, x):
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return self.project(torch.cat([x, F.interpolate(pooled, size=x.shape[-2:], mode="bilinear")], dim=1))


class Net(nn.Module):
    """stem (stride 2) -> block1 -> <block under test> -> tail."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.block2 = block
        self.tail = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.tail(self.block2(self.block1(self.stem(x))))


CASES = {
    "squeeze-excitation": lambda: SE(4),
    "global norm": lambda: GRN(4),
    "attention": lambda: NonLocal(4),
    "global pooling branch": lambda: ImagePool(4),
    "group norm": lambda: nn.GroupNorm(2, 4),
}
STREAMED = ("squeeze-excitation", "global norm", "global pooling branch", "group norm")  # issue 20


@pytest.mark.parametrize("category", sorted(set(CASES) - set(STREAMED)))
def test_rejection_names_category_and_largest_prefix(category):
    torch.manual_seed(0)
    model = Net(CASES[category]()).double().eval()
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=32)
    message = str(info.value)
    assert f"{category}:" in message
    suggestion = re.search(r"largest streamable prefix: boundary='([^']+)' \(node '\w+', stride (\d+)\)", message)
    assert suggestion is not None, message
    assert suggestion.group(1) == "block1" and suggestion.group(2) == "2"
    x = torch.randn(1, 3, 41, 35, dtype=torch.float64)
    check_streamed(model, x, 14, boundary=suggestion.group(1), min_tiles=4)


@pytest.mark.parametrize("category", STREAMED)
def test_global_statistics_stream_whole_with_their_category(category):
    """The statistics blocks (issue 20) stream whole and exactly; the plan names their category."""
    torch.manual_seed(0)
    model = Net(CASES[category]()).double().eval()
    for m in model.modules():
        if isinstance(m, (nn.GroupNorm, GRN)):
            nn.init.normal_(m.weight, 1.0, 0.3)
            nn.init.normal_(m.bias, 0.0, 0.3)
    smodel = fxstream.compile(model, tile_size=14)
    expected = "global norm" if category == "group norm" else category
    assert [s[3] for s in smodel.plan.statistics] == [expected] and smodel.plan.levels == 1
    check_streamed(model, torch.randn(1, 3, 41, 35, dtype=torch.float64), 14, streamed=smodel, min_tiles=4)
