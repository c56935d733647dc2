"""Library models with global statistics stream whole and exactly (issue 20, step 8): float64,
random weights (nothing downloaded), small images, both schedules; the output, every parameter
gradient and the input gradient within 1e-10 of the plain model.

* torchvision ``deeplabv3_resnet50``: ASPP's image pooling, one level;
* smp FPN (GroupNorm in the segmentation blocks, three levels; its merge stacks the levels),
  PSPNet and UPerNet (pyramid pooling, one level: the bins share it);
* MONAI ``BasicUNet`` with InstanceNorm: 18 levels, with ``max_levels=18``;
* timm ``efficientnet_b0`` (SE, 16 levels) and ``convnextv2_atto`` (GRN, 12 levels), with
  ``max_levels`` raised, one schedule each.

Receptive fields (1056 px for DeepLabV3, 851 for EfficientNet) exceed these images: the
recompute tiles (2 x 2, uniform blocks) read clipped regions while the deeper nodes compute
partial ones; under carry a cell boundary inside such a receptive field would leave cells
empty, so the carry tiling has one tile there, and several for FPN, PSPNet and BasicUNet.
"""

from __future__ import annotations

import math
import warnings

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torchvision
from exactness import rel_err
from monai.networks.nets import BasicUNet
from test_statistics import grad_err, randomise
from torch.utils._pytree import tree_flatten

import fxstream

warnings.filterwarnings("ignore", category=UserWarning, module="monai")
pytestmark = pytest.mark.usefixtures("uniform_tiles", "schedule")
RTOL = 1e-10
SMP = dict(encoder_weights=None, classes=2)


def compare(model, x, smodel, min_tiles: int = 1) -> float:
    """The worst error of output(s), input gradient and parameter gradients (a gradient that
    is zero by the math, a convolution bias before a norm, relative to the largest)."""
    tiles = smodel.shape_plan(*x.shape[2:]).num_tiles
    assert tiles >= min_tiles, tiles
    params = [p for p in model.parameters() if p.requires_grad]
    x_p, x_s = x.clone().requires_grad_(), x.clone().requires_grad_()
    refs, spec = tree_flatten(model(x_p))
    outs, spec_s = tree_flatten(smodel(x_s))
    assert spec == spec_s and all(o.shape == r.shape and o.dtype == r.dtype for o, r in zip(outs, refs))
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(r.shape, generator=gen, dtype=r.dtype) for r in refs]
    g_p = torch.autograd.grad(refs, [x_p] + params, grads)
    g_s = torch.autograd.grad(outs, [x_s] + params, grads)
    scale = max(float(g.abs().max()) for g in g_p)
    errors = {f"output {i}": rel_err(o.detach(), r.detach()) for i, (o, r) in enumerate(zip(outs, refs))}
    names = ["input"] + [n for n, p in model.named_parameters() if p.requires_grad]
    errors.update({n: grad_err(a, b, scale) for n, a, b in zip(names, g_s, g_p)})
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{worst}: {errors[worst]:.2e} ({tiles} tiles)"
    return errors[worst]


def tile_for(smodel, size, schedule: str, carry_tile: int) -> int:
    """Recompute: the tile whose block is half the trunk output along each axis (2 x 2 tiles);
    carry: ``carry_tile`` (the plan's smallest blocks; empty cells merge tiles)."""
    plan = smodel.plan
    rf, stride = plan.receptive_field[0], plan.stride[0]
    return rf + math.ceil(stride * (size[0] / stride / 2 - 1)) if schedule == "recompute" else carry_tile


def streams(factory, size, schedule, carry_tile=24, levels=None, max_levels=fxstream.module.MAX_LEVELS, tiles=1):
    torch.manual_seed(0)
    model = randomise(factory().eval())
    probe = fxstream.compile(model, tile_size=4096, max_levels=max_levels)
    if levels is not None:
        assert probe.plan.levels == levels
    tile = tile_for(probe, size, schedule, carry_tile)
    smodel = fxstream.compile(model, tile_size=tile, max_levels=max_levels, schedule=schedule)
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    worst = compare(model, x, smodel, tiles if schedule == "recompute" else 1)
    print(
        f"\n{factory.__name__ if hasattr(factory, '__name__') else factory}: {schedule}, "
        f"{smodel.shape_plan(*size).grid} tiles, worst error {worst:.1e}"
    )
    return smodel


def deeplabv3():
    return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)


@pytest.mark.slow
def test_deeplabv3_resnet50(schedule):
    smodel = streams(deeplabv3, (48, 40), schedule, levels=1, tiles=4)
    assert [s[3] for s in smodel.plan.statistics] == ["global pooling branch"]


@pytest.mark.slow
def test_smp_fpn(schedule):
    """smp FPN, its default merge (``torch.stack(x).sum(0)``) and GroupNorm in its segmentation
    blocks: three levels."""
    factory = lambda: smp.FPN("tu-resnet10t", encoder_depth=3, **SMP)  # noqa: E731
    smodel = streams(factory, (64, 64), schedule, levels=3, tiles=4)
    assert {s[3] for s in smodel.plan.statistics} == {"global norm"}


def test_smp_pspnet(schedule):
    factory = lambda: smp.PSPNet("tu-resnet10t", encoder_depth=3, **SMP)  # noqa: E731
    smodel = streams(factory, (64, 64), schedule, levels=1, tiles=4)
    assert len(smodel.plan.statistics) == 4  # the pyramid's bins, one level


def test_smp_upernet(schedule):
    factory = lambda: smp.UPerNet("tu-resnet10t", **SMP)  # noqa: E731
    streams(factory, (64, 64), schedule, levels=1, tiles=4)


def basic_unet():
    return BasicUNet(2, 3, 2, features=(4, 4, 4, 4, 4, 4), norm=("instance", {"affine": True}))


def test_monai_basic_unet_instance_norm(schedule):
    """18 dependent levels (two InstanceNorms per block, a chain through the skips): refused at
    the default max_levels, exact with max_levels=18."""
    with pytest.raises(fxstream.StatisticsError, match="18 dependent levels"):
        fxstream.compile(basic_unet(), tile_size=64)
    streams(basic_unet, (64, 64), schedule, levels=18, max_levels=18, tiles=4)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["carry"], indirect=True)  # the carry schedule's tiling
def test_monai_basic_unet_many_carry_tiles():
    """At 144 x 128 the carry tiling of BasicUNet has 5 x 4 tiles (its cells are non-empty)."""
    smodel = streams(basic_unet, (144, 128), "carry", max_levels=18)
    assert smodel.shape_plan(144, 128).num_tiles >= 16


@pytest.mark.parametrize("schedule", ["carry"], indirect=True)  # one schedule (CPU time)
def test_timm_efficientnet_b0():
    factory = lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=0)  # noqa: E731
    streams(factory, (64, 64), "carry", levels=16, max_levels=16)


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["recompute"], indirect=True)  # one schedule (CPU time)
def test_timm_convnextv2_atto():
    factory = lambda: timm.create_model("convnextv2_atto", pretrained=False, num_classes=0)  # noqa: E731
    smodel = streams(factory, (64, 64), "recompute", levels=12, max_levels=12, tiles=4)
    assert {s[3] for s in smodel.plan.statistics} == {"global norm"}
