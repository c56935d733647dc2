"""Memory truth: the measured tensor peak of one training step against the memory model's
prediction (``memory.streamed.training.bytes`` of ``fxstream plan``), under both schedules.

The peak is measured allocator-independently (fxstream/memory/truth.py: the profiler's CPU
allocation events, summed in time order) and counts the parameters, buffers, the input and
the target as the prediction's "resident" part. Every case is small (a few seconds) but has
what the large cases have: residual blocks, a streamed prefix with a plain head that
downsamples further, a U-Net's lagging skips and transposed convolutions, a 3-D net, a
trunk with several outputs, and a net whose stripe store outweighs its tile (wide 7x7
convolutions at full resolution, many small tiles). Their activations outweigh the
parameters and the input, so the comparison is about the tiles, the stripes, the trunk
output and the head.

Every placement of the carry schedule's stripes (``Schedule.stripes``) is measured too. On a
CPU the host *is* the device: the "host" store keeps its copies as CPU clones, so the
measured peak is the sum of the window, the host copies and the fetched stripes, and the
model predicts exactly that sum for a CPU compute device (``bytes``, which equals
``device_bytes``; ``host_bytes`` is 0 there). The split between device and host memory is
measured on CUDA (tests/test_cuda_stripes.py, benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from dense_zoo import UNet, randomise
from torchvision.models.resnet import BasicBlock

import fxstream
from fxstream import Schedule
from fxstream.cli.report import memory_model
from fxstream.memory import truth as memtruth

LOW, HIGH = 0.7, 1.15  # measured / predicted
CARRY_OVER_RECOMPUTE = 1.15  # carry's peak at most this over recompute's at the same tile (small stripes)


class MiniResNet(nn.Module):
    """A ResNet with torchvision's BasicBlock, narrow enough that activations dominate:
    stem (stride 4), layer1 (16), layer2 (32, stride 2), layer3 (64, stride 2), pooled linear head."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
        )
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, 2, _down(16, 32))
        self.layer3 = BasicBlock(32, 64, 2, _down(32, 64))
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _down(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=2, bias=False), nn.BatchNorm2d(cout))


class Pyramid(nn.Module):
    """Three trunk outputs (strides 2, 4, 8), each pooled by the head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1))
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.stage2 = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU())
        self.fc = nn.Linear(48, 3)

    def forward(self, x):
        f1 = self.stem(x)
        f2 = self.stage1(f1)
        f3 = self.stage2(f2)
        return self.fc(torch.cat([f1.mean((2, 3)), f2.amax((2, 3)), f3.mean((2, 3))], 1))


class StripeNet(nn.Module):
    """Four 7x7 convolutions of 24 channels at full resolution, then a stride-4 max pool and a
    pooled linear head: 6-pixel stripes of 24 channels at every layer, so at tile 64 the
    stripe store is about three times the largest tile's backward pass."""

    def __init__(self, channels: int = 24, layers: int = 4):
        super().__init__()
        body: list = [nn.Conv2d(3, channels, 7, padding=3), nn.ReLU()]
        for _ in range(layers - 1):
            body += [nn.Conv2d(channels, channels, 7, padding=3), nn.ReLU()]
        self.trunk = nn.Sequential(*body, nn.MaxPool2d(4))
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.trunk(x), 1), 1))


class DenseLoss(nn.Module):
    """A dense network with its loss in the model: cross-entropy against class 0 at every
    pixel. A loss outside the model is invisible to the memory model, and on a dense output
    it costs a few maps of the output's size (log-softmax, its gradient)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return -F.log_softmax(self.net(x), 1)[:, 0].mean()


# name: (builder, compile keywords, input shape, tile)
CASES = {
    "resnet": (MiniResNet, {}, (1, 3, 384, 384), 160),
    "resnet_prefix": (MiniResNet, {"boundary": "layer1"}, (1, 3, 512, 512), 192),
    "unet2d": (
        lambda: DenseLoss(UNet(in_ch=3, classes=2, base=8, depth=3)),
        {"boundary": "net"},
        (1, 3, 256, 256),
        128,
    ),
    "unet3d": (
        lambda: DenseLoss(UNet(in_ch=1, classes=2, base=8, depth=1, ndim=3)),
        {"boundary": "net"},
        (2, 1, 48, 48, 48),
        36,
    ),
    "pyramid": (Pyramid, {}, (1, 3, 384, 320), 96),
    "stripes": (StripeNet, {}, (1, 3, 512, 384), 64),
}
PLACEMENTS = {
    "device": Schedule("carry", stripes="device"),
    "host": Schedule("carry", stripes="host"),
    "banded": Schedule("carry", stripes="banded", band_rows=1),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return randomise(CASES[name][0]().eval())


def measure_step(name: str, schedule: str | Schedule | None) -> tuple[memtruth.Truth, object]:
    """The measured peak of one training step of case ``name`` (``schedule`` None: plain
    autograd) and the memory model's estimate (None for plain). The loss is a label's
    cross-entropy for a classifier, the model's own output for a dense net."""
    _, kwargs, shape, tile = CASES[name]
    net = _build(name)
    x = torch.randn(shape)
    model, estimate = net, None
    if schedule is not None:
        model = fxstream.compile(net, tile_size=tile, schedule=schedule, **kwargs)
        estimate = memory_model(model, shape, torch.float32)[0].estimate(shape[2:])
        with torch.no_grad():
            model(x)  # plan the tiling before measuring (the plan's caches are not the step's)
    target = torch.zeros(shape[0], dtype=torch.long)

    def step():
        out = model(x)
        (out if out.dim() == 0 else F.cross_entropy(out, target)).backward()

    net.zero_grad(set_to_none=True)
    truth = memtruth.measure(step, resident=[*net.parameters(), *net.buffers(), x, target])
    assert all(p.grad is not None for p in net.parameters())
    return truth, estimate


@pytest.mark.parametrize("schedule", ["carry", "recompute"])
@pytest.mark.parametrize("name", list(CASES))
def test_measured_peak_is_predicted(name, schedule):
    truth, estimate = measure_step(name, schedule)
    predicted = estimate.streamed_training
    ratio = truth.total / predicted.total
    detail = f"{name} {schedule}: measured {truth.total} in {truth.phase}, predicted {predicted.to_dict()}"
    assert LOW <= ratio <= HIGH, detail
    assert truth.resident < 0.5 * truth.total, detail  # the comparison is about the step, not the parameters


@pytest.mark.parametrize("name", ["resnet", "pyramid"])
def test_carry_holds_about_what_recompute_holds(name):
    """Where the stripes are thin, carry's peak is about recompute's at the same tile size."""
    carry, estimate = measure_step(name, "carry")
    recompute, _ = measure_step(name, "recompute")
    assert estimate.streamed_training.parts.get("stripe store", 0) < 0.1 * carry.total
    assert carry.total <= CARRY_OVER_RECOMPUTE * recompute.total, (carry.total, recompute.total)


def test_plain_prediction_counts_no_stripes():
    _, estimate = measure_step("unet2d", "carry")
    streamed, plain = estimate.streamed_training, estimate.plain_training
    assert streamed.parts["stripe store"] > 0 and "pending grads" in streamed.parts
    assert not any("stripe" in k or "pending" in k for k in plain.parts)
    assert not any("stripe" in k or "pending" in k for k in estimate.plain_inference.parts)


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("name", ["stripes", "unet2d", "unet3d", "pyramid"])
def test_measured_peak_is_predicted_for_each_placement(name, placement):
    truth, estimate = measure_step(name, PLACEMENTS[placement])
    predicted = estimate.streamed_training
    ratio = truth.total / predicted.total
    detail = f"{name} {placement}: measured {truth.total} in {truth.phase}, predicted {predicted.to_dict()}"
    assert LOW <= ratio <= HIGH, detail
    # on a CPU every part is on the one device
    assert predicted.device.total == predicted.total and predicted.host.total == 0, detail


def test_banded_stripes_hold_one_band():
    """Where the stripe store dominates, banded carry holds one band of it: measured, the
    step's peak falls by most of the store, as predicted."""
    device, device_estimate = measure_step("stripes", PLACEMENTS["device"])
    banded, banded_estimate = measure_step("stripes", PLACEMENTS["banded"])
    store = device_estimate.streamed_training.parts["stripe store"]
    assert store > 0.4 * device.total  # the case is about the stripes
    band = banded_estimate.streamed_training.parts["stripe store (one band)"]
    assert band < 0.15 * store
    assert device.total - banded.total > 0.7 * (store - band), (device.total, banded.total, store, band)
