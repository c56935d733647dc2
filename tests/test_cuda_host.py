"""CUDA: a host-resident image (pinned or not, uint8 or float) streamed into a model on
the GPU; input gradients and (optionally) the trunk output on the host. Skipped on
machines without CUDA; tests/test_host_input.py runs the same code paths on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from exactness import RTOL64, rel_err
from test_host_input import MEAN, SCALE, STD, make, normalise

import fxstream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def grads_of(model, out, grad, trunk_only=False):
    params = [p for name, p in model.named_parameters() if not (trunk_only and name.startswith("fc."))]
    return torch.autograd.grad(out, params, grad)


@pytest.mark.parametrize("pinned", [False, True])
def test_uint8_host_image_into_cuda_model(pinned):
    model = make().cuda()
    x = torch.randint(0, 256, (2, 3, 37, 29), dtype=torch.uint8)
    if pinned:
        x = x.pin_memory()
    smodel = fxstream.compile(model, tile_size=14, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    out = smodel(x)
    ref = model(normalise(x).cuda())
    assert out.device.type == "cuda" and x.device.type == "cpu"
    grad = torch.randn_like(ref)
    assert rel_err(out.detach(), ref.detach()) <= RTOL64
    for a, b in zip(grads_of(model, out, grad), grads_of(model, ref, grad)):
        assert rel_err(a, b) <= RTOL64


def test_input_gradient_assembled_on_host():
    model = make().cuda()
    x = torch.randn(1, 3, 31, 26, dtype=torch.float64).requires_grad_()
    x_ref = x.detach().cuda().requires_grad_()
    smodel = fxstream.compile(model, tile_size=14)
    (g,) = torch.autograd.grad(smodel(x).sum(), x)
    (g_ref,) = torch.autograd.grad(model(x_ref).sum(), x_ref)
    assert g.device.type == "cpu"
    assert rel_err(g, g_ref.cpu()) <= RTOL64


def test_trunk_output_on_host():
    """output_device='cpu' with the model on the GPU: the trunk output lives on the host,
    the head runs there (moved by the user), gradients flow back tile by tile."""
    model = make().cuda()
    x = torch.randn(2, 3, 33, 30, dtype=torch.float64, device="cuda")
    smodel = fxstream.compile(model, tile_size=14, boundary="conv2", output_device="cpu")
    feats = smodel.streamed_trunk(x)
    ref = model.conv2(model.pool(F.relu(model.conv1(x))))
    assert feats.device.type == "cpu"
    grad = torch.randn(ref.shape, dtype=ref.dtype)
    assert rel_err(feats.detach(), ref.detach().cpu()) <= RTOL64
    for a, b in zip(grads_of(model, feats, grad, True), grads_of(model, ref, grad.cuda(), True)):
        assert rel_err(a, b) <= RTOL64


def test_host_image_never_moves_whole_to_the_gpu():
    """Peak GPU memory (trunk output, its gradient, one tile) stays below the float
    image: only tiles move to the GPU."""
    model = make().float().cuda()
    x = torch.randint(0, 256, (1, 3, 2048, 2048), dtype=torch.uint8).pin_memory()
    smodel = fxstream.compile(model, tile_size=256, input_transform=fxstream.Normalize(MEAN, STD, scale=SCALE))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    smodel(x).sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    float_image = x.numel() * 4
    assert peak < float_image, f"peak {peak / 2**20:.1f} MiB"
    assert smodel.last_stats.peak_memory is not None
