"""The model families people use, from timm, segmentation_models_pytorch (smp), MONAI and
torchvision, with random weights (nothing is downloaded).

Each family either streams exactly in float64 (the whole model where it is local, else a
prefix named with ``boundary=``), or is rejected with the category of its non-local op and a
``boundary=`` suggestion that compiles. Images are small and tiles are a few pixels larger
than the receptive field, so each case runs on a few tiles in seconds.

Families whose trunk has several outputs stream them together (see tests/test_multi_output.py):
timm ``features_only``, torchvision's FPN backbones, smp DeepLabV3Plus's encoder (its stride-4
skip and stride-16 ASPP input, with the decoder's image pooling run plain).
"""

from __future__ import annotations

import re
import warnings

import pytest
import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn as nn
import torchvision
from exactness import check_streamed
from monai.networks.layers import Norm
from monai.networks.nets import BasicUNet, DynUNet, FlexibleUNet, UNet
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import fxstream

warnings.filterwarnings("ignore", category=UserWarning, module="monai")


def tm(name: str, **kwargs):
    """A timm model without classifier (fewer parameters to compare gradients of)."""
    return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


SMP = dict(encoder_weights=None, encoder_depth=3, classes=2)  # no download; a shallow encoder
DECODER = (16, 8, 4)

# name -> (factory, boundary, image size: valid for the whole model, which check_streamed runs plain)
STREAMS = {
    # timm backbones: a prefix (the whole trunk's receptive field is hundreds of pixels)
    "timm.resnet50": (tm("resnet50"), "layer1", (70, 61)),
    "timm.resnet50d": (tm("resnet50d"), "layer2", (150, 133)),  # deep stem, avg-pool shortcut
    "timm.resnext50_32x4d": (tm("resnext50_32x4d"), "layer1", (70, 61)),
    "timm.res2net50_14w_8s": (tm("res2net50_14w_8s"), "layer1.0", (54, 47)),  # torch.split
    "timm.cspresnet50": (tm("cspresnet50"), "stages.0", (70, 61)),  # chunk
    "timm.dla34": (tm("dla34"), "level2", (96, 64)),
    "timm.hrnet_w18_small": (tm("hrnet_w18_small"), "layer1", (64, 64)),
    "timm.convnext_atto": (tm("convnext_atto"), "stages.0", (83, 70)),  # channels-last LayerNorm
    "timm.xception41": (tm("xception41"), "blocks.0", (54, 47)),
    "timm.inception_v3": (tm("inception_v3"), "Conv2d_4a_3x3", (83, 76)),
    # vgg's head branches on sizes (the concrete tracer)
    "timm.vgg11": (tm("vgg11", mlp_ratio=1 / 64), "features.5", (38, 33)),
    "torchvision.shufflenet_v2": (lambda: torchvision.models.shufflenet_v2_x0_5(), "stage2", (107, 93)),
    # several trunk outputs: a feature pyramid (a list), an FPN backbone (an OrderedDict)
    "timm.resnet18.features_only": (
        lambda: timm.create_model("resnet18", pretrained=False, features_only=True, out_indices=(0, 1, 2)),
        None,
        (170, 150),
    ),
    "torchvision.resnet_fpn_backbone": (lambda: fpn_backbone(), None, (190, 170)),
    # the encoder (stride 4 and 16 outputs); ASPP's image pooling runs plain. Sizes: multiples of 16 (smp checks)
    "smp.DeepLabV3Plus.encoder": (
        lambda: smp.DeepLabV3Plus("tu-resnet10t", encoder_weights=None, classes=2),
        "encoder",
        (224, 224),
    ),
    # segmentation models: the whole model
    "smp.Unet": (lambda: smp.Unet("tu-resnet10t", decoder_channels=DECODER, **SMP), None, (200, 176)),
    "smp.UnetPlusPlus": (lambda: smp.UnetPlusPlus("tu-resnet10t", decoder_channels=DECODER, **SMP), None, (168, 144)),
    "smp.Linknet": (lambda: smp.Linknet("tu-resnet10t", **SMP), None, (120, 104)),  # skip.shape[1] != 0
    "monai.UNet": (
        lambda: UNet(2, 3, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm=Norm.BATCH),
        None,
        (56, 48),
    ),
    "monai.DynUNet": (
        lambda: DynUNet(2, 3, 2, [3, 3, 3], [1, 2, 2], [2, 2], norm_name="batch", filters=[4, 8, 16]),
        None,
        (64, 56),
    ),
    "monai.BasicUNet": (lambda: BasicUNet(2, 3, 2, features=(4, 4, 4, 4, 4, 4), norm=("batch", {})), None, (272, 240)),
    # a prefix whose tensors the decoder also reads (the trace test below streams the whole model)
    "monai.FlexibleUNet": (lambda: flexible_unet(), "encoder.act", (64, 64)),
}


def fpn_backbone():
    """torchvision's detection backbone: resnet18 up to layer2, FPN with LastLevelMaxPool."""
    return resnet_fpn_backbone(
        backbone_name="resnet18", weights=None, returned_layers=[1, 2], trainable_layers=5, norm_layer=nn.BatchNorm2d
    )


def flexible_unet():
    return FlexibleUNet(3, 2, "resnet10", pretrained=False, decoder_channels=(8, 8, 8, 8, 8), norm="batch")


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_family_streams_exactly(name):
    factory, boundary, size = STREAMS[name]
    torch.manual_seed(0)
    model = factory().double().eval()
    rf = fxstream.compile(model, tile_size=4096, boundary=boundary).plan.receptive_field
    tile = tuple((r + s) // 2 for r, s in zip(rf, size))  # about 2x2 tiles
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    check_streamed(model, x, tile, boundary=boundary, min_tiles=2)


def test_hrnet_features_only_streams_its_parallel_branches():
    """HRNet's five feature maps come from parallel branches that exchange features at every
    stage (outputs that share intermediate maps, none read by another): 2x2 tiles at float64."""
    torch.manual_seed(0)
    model = timm.create_model("hrnet_w18_small", pretrained=False, features_only=True).double().eval()
    smodel = fxstream.compile(model, tile_size=480)
    assert len(smodel.program().geometry.outputs) == 5
    assert smodel.shape_plan(704, 672).grid == (2, 2)
    check_streamed(model, torch.randn(1, 3, 704, 672, dtype=torch.float64), 480, streamed=smodel)


def test_flexible_unet_traces_and_streams_whole():
    """torch.fx refuses FlexibleUNet; fxstream traces it, and its whole model is local."""
    smodel = fxstream.compile(flexible_unet().eval(), tile_size=1024)
    assert smodel.plan.stride == (1, 1)


# name -> (factory, category)
REJECTS = {
    "timm.efficientnet_b0": (tm("efficientnet_b0"), "squeeze-excitation"),
    "timm.mobilenetv3_small_050": (tm("mobilenetv3_small_050"), "squeeze-excitation"),
    "timm.regnety_002": (tm("regnety_002"), "squeeze-excitation"),
    "timm.convnextv2_atto": (tm("convnextv2_atto"), "global norm"),  # GRN's Tensor.norm
    "smp.FPN": (lambda: smp.FPN("tu-resnet10t", **SMP), "global norm"),  # GroupNorm in the decoder
    "smp.PAN": (lambda: smp.PAN("tu-resnet10t", encoder_weights=None, classes=2), "global pooling branch"),
    "smp.MAnet": (lambda: smp.MAnet("tu-resnet10t", decoder_channels=DECODER, **SMP), "attention"),
    # ASPP's image pooling; the suggestion is the encoder, with its stride-4 skip as a second output
    "smp.DeepLabV3Plus": (
        lambda: smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=2),
        "global pooling branch",
    ),
}


@pytest.mark.parametrize("name", sorted(REJECTS))
def test_family_rejected_with_category_and_boundary(name):
    factory, category = REJECTS[name]
    torch.manual_seed(0)
    model = factory().eval()
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=512)
    message = str(info.value)
    assert f"{category}:" in message, message
    found = re.search(r"largest streamable prefix: boundary='([^']+)' \(node '\w+', stride (\d+)\)", message)
    assert found is not None, message
    smodel = fxstream.compile(model, tile_size=512, boundary=found.group(1))
    assert smodel.plan.stride == (int(found.group(2)),) * 2


def test_basic_unet_streams_sizes_that_branch_otherwise():
    """BasicUNet pads its up-sampled maps only at odd sizes; traced at a multiple of 16, the
    compiled module traces again at the first odd size and streams it exactly."""
    torch.manual_seed(0)
    model = BasicUNet(2, 3, 2, features=(4, 4, 4, 4, 4, 4), norm=("batch", {})).double().eval()
    smodel = fxstream.compile(model, tile_size=128)
    check_streamed(model, torch.randn(1, 3, 66, 50, dtype=torch.float64), 128, streamed=smodel)


def test_vgg_head_streams_sizes_that_branch_otherwise():
    """timm's vgg head pools to 7x7 only when the feature map is smaller; traced on a small
    sample, the compiled module traces again at a larger size (the guard is in the head,
    after the trunk) and returns the model's output there."""
    model = tm("vgg11", mlp_ratio=1 / 64)().double().eval()
    smodel = fxstream.compile(model, tile_size=320)  # at 256 pixels the head's 7x7 conv streams too
    check_streamed(model, torch.randn(1, 3, 256, 256, dtype=torch.float64), 320, streamed=smodel)
