"""CUDA: the same exactness on the GPU (tile windows, index gathers and pooling divisors
built on the right device). Skipped on machines without CUDA."""

from __future__ import annotations

import pytest
import torch
import torchvision
from exactness import check_streamed
from zoo import build

import fxstream

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", ["padding_modes", "pools", "convnext_style", "branchy_dag"])
def test_zoo_on_cuda_float64(name):
    model, channels = build(name)
    model = model.cuda()
    x = torch.randn(2, channels, 50, 41, dtype=torch.float64, device="cuda")
    plan = fxstream.compile(model, tile_size=4096).plan
    tile = tuple(r + s for r, s in zip(plan.receptive_field, plan.stride))  # blocks of 2 output pixels
    check_streamed(model, x, tile, min_tiles=4)


def test_resnet18_on_cuda_float32():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().cuda()
    x = torch.randn(1, 3, 700, 555, device="cuda")
    check_streamed(model, x, 435 + 32 * 3, min_tiles=4)


def test_compile_on_cpu_then_move_to_cuda():
    model, channels = build("batchnorm")
    smodel = fxstream.compile(model, tile_size=12)
    smodel.cuda()
    x = torch.randn(1, channels, 30, 25, dtype=torch.float64, device="cuda")
    check_streamed(model, x, None, streamed=smodel, min_tiles=4)
