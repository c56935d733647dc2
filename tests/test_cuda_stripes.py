"""CUDA: where carry keeps its stripes (``Schedule.stripes``) on an accelerator. Host stripes
go to pinned host memory on a side stream and come back one tile ahead of the backward
pass; banded carry rebuilds its bands on the device. Exact in float64, and the device holds
what the memory model says (``device_bytes``). Skipped on machines without CUDA;
tests/test_stripes.py runs the same bookkeeping on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import check_streamed
from test_memory_truth import HIGH, LOW, StripeNet
from zoo import build

import fxstream
from fxstream import Schedule
from fxstream.cli.report import memory_model
from fxstream.memory import truth as memtruth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PLACEMENTS = {
    "device": Schedule("carry", stripes="device"),
    "host": Schedule("carry", stripes="host"),
    "banded": Schedule("carry", stripes="banded", band_rows=1),
}


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_default_on_cuda_is_host_stripes():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)).cuda()
    smodel = fxstream.compile(model, tile_size=10)
    out = smodel(torch.randn(1, 1, 51, 29, device="cuda"))
    store = out.grad_fn.store
    assert store.placement == "host" and not store.live and store.host
    assert all(t.is_pinned() and t.device.type == "cpu" for t in store.host.values())
    out.sum().backward()
    assert not store.host and not store.fetched


@pytest.mark.parametrize("placement", ["host", "banded"])
@pytest.mark.parametrize("name", ["padding_modes", "branchy_dag"])
def test_zoo_exact_on_cuda_float64(name, placement):
    model, channels = build(name)
    model = model.cuda()
    x = torch.randn(2, channels, 61, 47, dtype=torch.float64, device="cuda")
    smodel = fxstream.compile(model, tile_size=24, schedule=PLACEMENTS[placement])
    assert smodel.shape_plan(61, 47).grid[0] >= 3
    check_streamed(model, x, 24, streamed=smodel)


@pytest.mark.parametrize("placement", ["host", "banded"])
def test_host_image_host_output_exact(placement):
    """The image and the trunk output in host memory, stripes in host memory or banded."""
    model, channels = build("padding_modes")
    model = model.cuda()
    x = torch.randn(1, channels, 57, 45, dtype=torch.float64).pin_memory()
    smodel = fxstream.compile(model, tile_size=20, schedule=PLACEMENTS[placement], output_device="cpu")
    out = smodel(x)
    ref = model(x.cuda())
    assert out.device.type == "cpu"
    grad = torch.randn(ref.shape, dtype=ref.dtype)
    params = list(model.parameters())
    for a, b in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad.cuda())):
        assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-10


def _step_peak(placement: str, shape=(1, 3, 1024, 768), tile=128) -> tuple[int, object]:
    """The measured device peak of one training step of the stripe-heavy net (image in host
    memory) and the model's estimate for CUDA."""
    torch.manual_seed(0)
    net = StripeNet().cuda().eval()
    x = torch.randn(shape).pin_memory()
    smodel = fxstream.compile(net, tile_size=tile, schedule=PLACEMENTS[placement])
    estimate = memory_model(smodel, shape, torch.float32, "cuda")[0].estimate(shape[2:])
    with torch.no_grad():
        smodel(x)  # plan the tiling first
    target = torch.zeros(1, dtype=torch.long, device="cuda")
    net.zero_grad(set_to_none=True)

    def step():
        F.cross_entropy(smodel(x), target).backward()

    truth = memtruth.measure(step, resident=[*net.parameters(), *net.buffers()], device="cuda")
    return truth.total, estimate


@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_device_peak_is_predicted(placement):
    measured, estimate = _step_peak(placement)
    predicted = estimate.streamed_training.device.total
    assert LOW <= measured / predicted <= HIGH, (placement, measured, estimate.streamed_training.to_dict())


def test_host_stripes_leave_the_device():
    """The stripe store dominates the device store's peak; host stripes leave a window."""
    device, estimate = _step_peak("device")
    host, _ = _step_peak("host")
    store = estimate.streamed_training.parts["stripe store"]
    assert store > 0.3 * device
    assert device - host > 0.7 * store, (device, host, store)
