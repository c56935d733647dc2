"""Host-resident input: uint8 images normalised per tile, input gradients and the trunk
output assembled next to the image. On a CPU-only machine the host and the compute
device coincide and the same code paths run (tests/test_cuda_host.py covers a GPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from exactness import RTOL64, rel_err

import fxstream

pytestmark = pytest.mark.usefixtures("schedule")

MEAN, STD, SCALE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1 / 255


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5, padding=2, padding_mode="reflect")
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(self.pool(F.relu(self.conv1(x))))).mean((2, 3)))


def make():
    torch.manual_seed(0)
    return Net().double().eval()


def normalise(x):
    """The float pipeline: normalise the whole image first."""
    shape = (1, -1, 1, 1)
    mean = torch.tensor(MEAN, dtype=torch.float64).view(shape)
    std = torch.tensor(STD, dtype=torch.float64).view(shape)
    return (x.double() * SCALE - mean) / std


def compare(model, smodel, x_ref, x_str, rtol=RTOL64):
    params = list(model.parameters())
    ref, out = model(x_ref), smodel(x_str)
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    g_ref = torch.autograd.grad(ref, params, grad)
    g_str = torch.autograd.grad(out, params, grad)
    assert rel_err(out, ref) <= rtol
    for (name, _), a, b in zip(model.named_parameters(), g_str, g_ref):
        assert rel_err(a, b) <= rtol, name


def test_uint8_input_with_normalize_equals_float_pipeline():
    model = make()
    x = torch.randint(0, 256, (2, 3, 37, 29), dtype=torch.uint8)
    smodel = fxstream.compile(model, tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    assert len(smodel.shape_plan(37, 29).tiles) >= 4
    compare(model, smodel, normalise(x), x)


def test_normalize_tile_equals_whole_image_normalisation_bitwise():
    x = torch.randint(0, 256, (1, 3, 9, 7), dtype=torch.uint8)
    tile = fxstream.Normalize(MEAN, STD, scale=SCALE)(x[..., 2:6, 1:5], torch.float64)
    assert torch.equal(tile, normalise(x)[..., 2:6, 1:5])


def test_float_input_gradient_through_normalize():
    """Input gradients of a float host image are taken through the per-tile transform."""
    model = make()
    x = (torch.rand(1, 3, 31, 26, dtype=torch.float64) * 255).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    smodel = fxstream.compile(model, tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    (g_str,) = torch.autograd.grad(smodel(x).sum(), x)
    (g_ref,) = torch.autograd.grad(model(normalise(x_ref)).sum(), x_ref)
    assert g_str.device == x.device
    assert rel_err(g_str, g_ref) <= RTOL64


def test_output_on_host_device_option():
    """output_device='cpu': the trunk output and its gradient are assembled on the host."""
    model = make()
    x = torch.randn(2, 3, 33, 30, dtype=torch.float64)
    smodel = fxstream.compile(model, tile_size=14, output_device="cpu")
    assert smodel.streamed_trunk.output_device == torch.device("cpu")
    compare(model, smodel, x, x)


def test_normalize_scalar_mean_std_and_repr():
    norm = fxstream.Normalize(0.5, 0.25, scale=2.0)
    x = torch.tensor([[[[1.0]], [[2.0]]]])
    assert torch.equal(norm(x), (x * 2.0 - 0.5) / 0.25)
    assert "scale=2.0" in repr(norm)


@pytest.mark.parametrize("micro_batch_size", [1, 2])
def test_serial_training_on_uint8_batch(micro_batch_size):
    model = make()
    x = torch.randint(0, 256, (3, 3, 30, 25), dtype=torch.uint8)
    y = torch.tensor([0, 1, 1])
    F.cross_entropy(model(normalise(x)), y).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    smodel = fxstream.compile(model, tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    fxstream.serial_backward(smodel, F.cross_entropy, x, y, micro_batch_size=micro_batch_size)
    for name, p in model.named_parameters():
        assert rel_err(p.grad, ref[name]) <= RTOL64, name
