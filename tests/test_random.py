"""Dropout, Dropout2d, torchvision StochasticDepth and a timm-style DropPath in a
training-mode trunk: the forward pass and the recomputation draw the same masks, the
streamed gradients are those of the function computed (an unstreamed autograd run with
the same masks, float64), and per-sample draws are the same in every tile."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision
from exactness import RTOL64, rel_err
from tile_recorder import record_tiles

import fxstream
from fxstream.runtime import rng

pytestmark = pytest.mark.usefixtures("schedule")


class DropPath(nn.Module):
    """timm-style drop path written with torch.rand: one draw per sample."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = 1 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        noise = (keep + torch.rand(shape, dtype=torch.float64)).floor()
        return x.div(keep) * noise


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.drop_path = DropPath(0.5)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.drop2d = nn.Dropout2d(0.3)
        self.depth = torchvision.ops.StochasticDepth(0.4, "row")
        self.conv3 = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv1(x)
        y = y + self.drop_path(y)
        y = self.conv2(self.drop(y))
        y = y + self.depth(self.drop2d(y))
        return self.conv3(y).mean((2, 3))

    def reference(self, x, seed):
        """The same function with explicit whole-image masks (origin 0): plain autograd."""

        def mask(t, p, name, mode):
            return rng.keep_mask(t.shape, p, seed, name, mode, (2, 3), (0, 0), t.device, t.dtype)

        y = self.conv1(x)
        y = y + self.drop_path(y)  # draws from torch's generator right after the seed
        y = self.conv2(y * mask(y, 0.2, "drop", "element"))
        z = y * mask(y, 0.3, "drop2d", "feature")
        y = y + z * mask(z, 0.4, "stochastic_depth", "row")
        return self.conv3(y).mean((2, 3))


def make():
    torch.manual_seed(0)
    return Net().double().train()


X = torch.randn(4, 2, 27, 22, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("tile_size", [9, 14, 64])
def test_streamed_equals_unstreamed_with_same_masks(tile_size):
    """Output, every parameter gradient and the input gradient; 64 is one tile."""
    model = make()
    smodel = fxstream.compile(model, tile_size=tile_size)
    params = list(model.parameters())
    grad = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    torch.manual_seed(123)
    x_str = X.clone().requires_grad_()
    out = smodel(x_str)
    state_after_streamed = torch.get_rng_state()
    g_str = torch.autograd.grad(out, [x_str] + params, grad)

    torch.manual_seed(123)
    seed = rng.draw_seed()  # what the streamed call drew first
    x_ref = X.clone().requires_grad_()
    ref = model.reference(x_ref, seed)
    g_ref = torch.autograd.grad(ref, [x_ref] + params, grad)

    assert rel_err(out.detach(), ref.detach()) <= RTOL64
    for name, a, b in zip(["input"] + [n for n, _ in model.named_parameters()], g_str, g_ref):
        assert rel_err(a, b) <= RTOL64, name
    # the generator advanced as in the whole-image pass (one per-sample draw)
    assert torch.equal(state_after_streamed, torch.get_rng_state())


def test_forward_and_recomputation_draw_the_same_masks():
    smodel = fxstream.compile(make(), tile_size=9)
    n_tiles = len(smodel.shape_plan(*X.shape[2:]).tiles)
    blocks = record_tiles(smodel, n_tiles)
    smodel(X).sum().backward()
    assert len(blocks["forward"]) == n_tiles >= 4
    assert len(blocks["backward"]) == n_tiles - 1  # the last forward tile kept its graph
    for key, bwd in blocks["backward"].items():
        assert torch.equal(blocks["forward"][key], bwd)


def test_per_sample_drop_path_is_the_same_in_every_tile():
    """With only DropPath random, each sample's trunk output is either 0 + residual or
    doubled in *every* tile: the per-sample draw does not change across tiles."""

    class OnlyDropPath(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
            self.drop_path = DropPath(0.5)

        def forward(self, x):
            return self.drop_path(self.conv(x)).mean((2, 3))

    model = OnlyDropPath().double().train()
    nn.init.ones_(model.conv.weight)
    smodel = fxstream.compile(model, tile_size=6)
    x = torch.ones(8, 1, 24, 24, dtype=torch.float64)
    assert len(smodel.shape_plan(24, 24).tiles) >= 16
    feats = {}
    trunk = smodel.streamed_trunk
    run_tile = trunk.run_tile

    def recording(x, tile, run, random=None):
        blocks = run_tile(x, tile, run, random)
        feats.setdefault(tile, blocks[0])
        return blocks

    trunk.run_tile = recording
    torch.manual_seed(5)
    smodel(x)
    kept = torch.stack([(b.flatten(1) != 0).all(1) for b in feats.values()])  # tiles x samples
    dropped = torch.stack([(b.flatten(1) == 0).all(1) for b in feats.values()])
    assert bool((kept | dropped).all())  # each tile keeps or drops a sample entirely
    assert bool((kept == kept[0]).all())  # the same decision in every tile
    assert 0 < int(kept[0].sum()) < 8


def test_new_masks_per_call_and_reproducible_with_manual_seed():
    smodel = fxstream.compile(make(), tile_size=9)
    torch.manual_seed(7)
    a, b = smodel(X), smodel(X)
    torch.manual_seed(7)
    c = smodel(X)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def test_keyed_mask_of_a_region_is_the_crop_of_the_whole_mask():
    """Position keying: the mask of a region starting at (5, 3) is the whole-image mask
    cropped there, whatever the region size."""
    shape = (2, 3, 40, 30)
    whole = rng.keep_mask(shape, 0.3, 11, "n", "element", (2, 3), (0, 0), torch.device("cpu"), torch.float64)
    part = rng.keep_mask((2, 3, 7, 9), 0.3, 11, "n", "element", (2, 3), (5, 3), torch.device("cpu"), torch.float64)
    assert torch.equal(part, whole[:, :, 5:12, 3:12])


@pytest.mark.parametrize("mode", ["element", "feature", "row", "batch"])
def test_keyed_mask_statistics(mode):
    """Keep rate 1 - p, scale 1 / (1 - p), and the mode's granularity."""
    p = 0.3
    shape = (64, 32, 40, 40)
    mask = rng.keep_mask(shape, p, 3, "n", mode, (2, 3), (0, 0), torch.device("cpu"), torch.float64)
    assert set(mask.unique().tolist()) <= {0.0, 1 / (1 - p)}
    kept = (mask != 0).double().expand(shape)
    per = {"element": kept, "feature": kept[:, :, 0, 0], "row": kept[:, 0, 0, 0], "batch": kept[0, 0, 0, 0]}[mode]
    assert bool((kept == kept[..., :1, :1]).all()) or mode == "element"
    if mode != "batch":
        assert abs(per.mean().item() - (1 - p)) < 4 * (p * (1 - p) / per.numel()) ** 0.5 + 1e-9
    if mode == "element":  # neighbouring pixels are independent
        agree = (kept[..., 1:, :] == kept[..., :-1, :]).double().mean().item()
        assert abs(agree - ((1 - p) ** 2 + p**2)) < 0.01


def test_eval_mode_keeps_dropout_as_identity():
    model = make().eval()
    smodel = fxstream.compile(model, tile_size=9)
    assert not smodel.streamed_trunk.random_ops
    assert torch.equal(smodel(X), smodel(X))


def test_channels_last_dropout_is_keyed_by_its_spatial_dims():
    """Dropout on a permuted (N, H, W, C) tensor, as in ConvNeXt blocks."""

    class ChannelsLast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.drop = nn.Dropout(0.3)
            self.linear = nn.Linear(4, 4)
            self.out = nn.Conv2d(4, 2, 3, padding=1)

        def forward(self, x):
            y = self.drop(self.conv(x).permute(0, 2, 3, 1))
            return self.out(self.linear(y).permute(0, 3, 1, 2)).mean((2, 3))

    torch.manual_seed(0)
    model = ChannelsLast().double().train()
    smodel = fxstream.compile(model, tile_size=9)
    torch.manual_seed(4)
    out = smodel(X)
    torch.manual_seed(4)
    seed = rng.draw_seed()
    y = model.conv(X).permute(0, 2, 3, 1)
    y = y * rng.keep_mask(y.shape, 0.3, seed, "drop", "element", (1, 2), (0, 0), y.device, y.dtype)
    ref = model.out(model.linear(y).permute(0, 3, 1, 2)).mean((2, 3))
    assert rel_err(out.detach(), ref.detach()) <= RTOL64
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)):
        assert rel_err(a, b) <= RTOL64
