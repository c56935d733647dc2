"""Every rejected op raises UnsupportedOpError at compile time, naming the module;
other user errors raise their own FxStreamError subclass with a useful message."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed

import fxstream


class Net(nn.Module):
    """conv -> <op under test> -> conv -> global pool head."""

    def __init__(self, op: nn.Module, channels: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.block = op
        self.tail = nn.Conv2d(channels, channels, 3, padding=1)
        self.fc = nn.Linear(channels, 2)

    def forward(self, x):
        y = self.tail(self.block(self.stem(x)))
        return self.fc(y.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels=4):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, 2, 1)
        self.fc2 = nn.Conv2d(2, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class CircularPad(nn.Module):
    def forward(self, x):
        return F.pad(x, (1, 1, 1, 1), mode="circular")


class Roll(nn.Module):
    def forward(self, x):
        return torch.roll(x, 1, dims=3)


class Interp(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.kwargs = kwargs

    def forward(self, x):
        return F.interpolate(x, scale_factor=2, mode="bilinear", **self.kwargs)


class SpatialLayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm([4, 16, 16])

    def forward(self, x):
        return self.norm(x)


# BatchNorm in training mode or without running statistics, GroupNorm, InstanceNorm and
# squeeze-excitation stream as global statistics (issue 20; tests/test_statistics.py).
REJECTED = {
    "layernorm_spatial": (SpatialLayerNorm, "spatial"),
    "circular_conv": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "circular"),
    "circular_pad": (CircularPad, "circular"),
    "unknown_op": (Roll, "does not know"),
    "dropout_train": (lambda: nn.AlphaDropout(0.5).train(), "alpha dropout"),
    "maxpool_indices": (lambda: nn.MaxPool2d(2, return_indices=True), "return_indices"),
    "upsample_fixed_size": (lambda: nn.Upsample(size=(16, 16)), "fixed size"),
    "interpolate_antialias": (lambda: Interp(antialias=True), "antialias"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_op_names_module(name):
    factory, words = REJECTED[name]
    model = Net(factory())
    model.eval()
    model.block.train(name in ("batchnorm_train", "dropout_train"))
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=64)
    err = info.value
    message = str(err)
    assert isinstance(err, fxstream.FxStreamError)
    assert err.module_path.startswith("block"), err.module_path
    assert "'block" in message  # the module path
    assert err.node in message  # the node
    assert "fix:" in message
    assert words.lower() in message.lower()
    assert "test_errors.py" in message  # the user's source line


def test_batchnorm_train_error_suggests_eval():
    """Above max_levels, a train-mode BatchNorm's refusal suggests eval mode."""
    model = Net(nn.BatchNorm2d(4)).train()
    with pytest.raises(fxstream.StatisticsError, match=r"call model\.eval\(\)"):
        fxstream.compile(model, tile_size=64, max_levels=0)


def test_boundary_before_rejected_op_streams_prefix_exactly():
    """boundary= stops streaming before a non-local op, which then runs normally."""
    torch.manual_seed(0)
    model = Net(nn.GroupNorm(2, 4)).double()
    smodel = fxstream.compile(model, tile_size=8, boundary="stem")
    assert smodel.plan.boundary == "stem"
    x = torch.randn(2, 3, 23, 19, dtype=torch.float64)
    check_streamed(model, x, 8, streamed=smodel, min_tiles=4)


def test_squeeze_excite_after_boundary_is_fine():
    torch.manual_seed(0)
    model = Net(SqueezeExcite()).double()
    smodel = fxstream.compile(model, tile_size=8, boundary="stem")
    check_streamed(model, torch.randn(1, 3, 20, 20, dtype=torch.float64), 8, streamed=smodel, min_tiles=4)


def test_train_mode_switch_is_checked_on_forward():
    """Compiled in eval mode, switched to train: the next call recompiles, and refuses the
    train-mode BatchNorm's statistics beyond max_levels (within it, they stream)."""
    model = Net(nn.BatchNorm2d(4)).eval()
    smodel = fxstream.compile(model, tile_size=16, max_levels=0)
    smodel(torch.randn(1, 3, 20, 20))
    smodel.train()
    with pytest.raises(fxstream.StatisticsError, match="BatchNorm2d"):
        smodel(torch.randn(1, 3, 20, 20))
    smodel.eval()
    smodel(torch.randn(1, 3, 20, 20))


@pytest.mark.parametrize("bad", [0, -3, 2.5, (16,), (16, 16, 16), "big", None, True])
def test_malformed_tile_size(bad):
    with pytest.raises(fxstream.TileSizeError):
        fxstream.compile(Net(nn.Identity()), tile_size=bad)


def test_tile_too_small_states_minimum():
    model = Net(nn.Conv2d(4, 4, 5, padding=2))
    with pytest.raises(fxstream.TileSizeError, match="at least tile_size=9x9") as info:
        fxstream.compile(model, tile_size=8, schedule="recompute")
    assert info.value.minimum == (9, 9)
    fxstream.compile(model, tile_size=9)


def test_unknown_boundary_suggests_names():
    with pytest.raises(fxstream.BoundaryError, match="Did you mean 'stem'"):
        fxstream.compile(Net(nn.Identity()), tile_size=16, boundary="stme")


def test_boundary_on_non_spatial_node():
    with pytest.raises(fxstream.BoundaryError, match="not a full-resolution"):
        fxstream.compile(Net(nn.Identity()), tile_size=16, boundary="fc")


class TwoScales(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1)

    def forward(self, x):
        a = self.a(x)
        b = self.b(a)
        return a.mean(dim=(2, 3)) + b.mean(dim=(2, 3))


def test_several_trunk_outputs_stream_together():
    """The head reads two trunk tensors: both are trunk outputs (tests/test_multi_output.py
    checks their exactness); boundary='a' streams only the first."""
    assert fxstream.compile(TwoScales(), tile_size=16).program().geometry.outputs == ("a", "b")
    assert fxstream.compile(TwoScales(), tile_size=16, boundary="a").program().geometry.outputs == ("a",)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return x


def test_untraceable_model():
    with pytest.raises(fxstream.TraceError, match="torch.fx could not trace DataDependent"):
        fxstream.compile(DataDependent(), tile_size=16)


class ExtraInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, mask):
        return self.conv(x * mask)


def test_second_input_in_trunk_is_rejected():
    with pytest.raises(fxstream.UnsupportedOpError, match="a model input other than the image"):
        fxstream.compile(ExtraInput(), tile_size=16)


class UsesSpatialSize(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        return y + y.shape[-1]


def test_spatial_size_inside_trunk_is_rejected():
    with pytest.raises(fxstream.UnsupportedOpError, match="uses the spatial size of a tensor inside the trunk"):
        fxstream.compile(UsesSpatialSize(), tile_size=16)


def test_wrong_input_rank():
    smodel = fxstream.compile(Net(nn.Identity()), tile_size=16)
    with pytest.raises(fxstream.InputShapeError, match="2 spatial dims"):
        smodel(torch.randn(3, 20, 20))


def test_input_too_small_for_network():
    model = nn.Sequential(nn.Conv2d(3, 3, 5), nn.Conv2d(3, 3, 5))
    smodel = fxstream.compile(model, tile_size=16)
    with pytest.raises(fxstream.InputShapeError, match="too small"):
        smodel(torch.randn(1, 3, 7, 30))


def test_not_a_module():
    with pytest.raises(fxstream.ArgumentError, match="expects an nn.Module"):
        fxstream.compile(lambda x: x, tile_size=16)


class InplaceReused(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.conv(x)
        z = self.act(y)
        return z + y  # y was modified in place by act


def test_inplace_op_on_reused_tensor_keeps_eager_semantics():
    """relu_(y) rewrites y in eager mode; later readers of y must see the rectified values."""
    torch.manual_seed(0)
    model = InplaceReused().double()
    check_streamed(model, torch.randn(1, 3, 19, 22, dtype=torch.float64), 6, min_tiles=4)


class InplaceAfterView(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        v = y.permute(0, 1, 3, 2).permute(0, 1, 3, 2)  # a view of y
        y.relu_()
        return v + 1  # eager: reads the rectified values through the view


def test_inplace_op_with_live_view_is_rejected():
    with pytest.raises(fxstream.UnsupportedOpError, match="a view of it"):
        fxstream.compile(InplaceAfterView(), tile_size=16)


class InplaceSafe(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        y += x
        y = y.mul_(2.0)
        return self.conv2(F.relu(y, inplace=True))


def test_inplace_ops_on_dead_tensors_are_exact():
    torch.manual_seed(0)
    model = InplaceSafe().double()
    check_streamed(model, torch.randn(2, 3, 17, 23, dtype=torch.float64), 9, min_tiles=4)
