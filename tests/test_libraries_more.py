"""Library models that fxstream used to reject falsely, or whose suggestion or trace failed
(issue 20): timm, smp and MONAI with random weights (nothing is downloaded).

Each case streams exactly in float64 under both schedules: the whole model where it is
local, else the prefix that streams (models with squeeze-excitation or GroupNorm keep those
global ops until the statistics passes land). Images are a few pixels larger than the
receptive field and tiles about half of that, so each case runs on a few tiles in seconds.
"""

from __future__ import annotations

import re
import warnings

import pytest
import timm
import torch
from exactness import check_streamed

import fxstream

warnings.filterwarnings("ignore", category=UserWarning, module="monai")


def tm(name: str, **kwargs):
    """A timm model without classifier (fewer parameters to compare gradients of)."""
    return lambda: timm.create_model(name, pretrained=False, num_classes=0, **kwargs)


def streams_exactly(model, boundary, margin=(40, 30), channels=3, multiple=1, **compile_args):
    """Check ``model`` (float64, eval) up to ``boundary`` on an image ``margin`` pixels larger
    than the receptive field (rounded up to a ``multiple``, for models that need one), with
    tiles about half as large: at least two tiles. Returns the compiled module."""
    rf = fxstream.compile(model, tile_size=4096, boundary=boundary, **compile_args).plan.receptive_field
    size = tuple(-(-(r + m) // multiple) * multiple for r, m in zip(rf, margin))
    tile = tuple((r + s) // 2 for r, s in zip(rf, size))
    smodel = fxstream.compile(model, tile_size=tile, boundary=boundary, **compile_args)
    x = torch.randn(1, channels, *size, dtype=torch.float64)
    assert smodel.shape_plan(*size).num_tiles >= 2
    check_streamed(model, x, tile, boundary=boundary, min_tiles=2, streamed=smodel)
    return smodel


def build(factory) -> torch.nn.Module:
    torch.manual_seed(0)
    return factory().double().eval()


# --- channel slicing x[:, a:b] ----------------------------------------------------------

# name -> (factory, a boundary past the channel slices; the whole model where it is local)
SLICING = {
    "timm.dpn68": (tm("dpn68"), "features.conv3_1"),  # x_s[:, :n], x_s[:, n:]
    "timm.ghostnet_050": (tm("ghostnet_050"), "blocks.2"),  # out[:, :out_chs, :, :]; SE from blocks.3
    "timm.rexnet_100": (tm("rexnet_100"), "features.2"),  # x[:, 0:c] + shortcut; SE from features.3
}


@pytest.mark.parametrize("name", sorted(SLICING))
def test_channel_slicing_streams(schedule, name):
    factory, boundary = SLICING[name]
    streams_exactly(build(factory), boundary)


def test_dpn68_streams_whole():
    """Nothing in dpn68's trunk is global: it streams to its last block (stride 32)."""
    smodel = fxstream.compile(tm("dpn68")().eval(), tile_size=1024)
    assert smodel.plan.stride == (32, 32) and smodel.plan.boundary.startswith("features_conv5")


# --- Tensor.repeat over channels ----------------------------------------------------------


def vnet(ndim: int):
    from monai.networks.nets import VNet

    return lambda: VNet(spatial_dims=ndim, in_channels=1, out_channels=2)


def test_vnet_repeat_streams(schedule):
    """VNet's input block adds x.repeat(1, 16, 1, 1) to its first convolution (the whole
    VNet needs sizes divisible by 16)."""
    streams_exactly(build(vnet(2)), "down_tr32", margin=(20, 4), channels=1, multiple=16)


def test_vnet_3d_input_block_streams(schedule):
    """The 3-D input block, x.repeat(1, 16, 1, 1, 1), alone (the whole 3-D VNet is slow to
    run plain at any size it accepts)."""
    streams_exactly(build(lambda: vnet(3)().in_tr), None, margin=(9, 8, 6), channels=1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_vnet_streams_whole(ndim):
    smodel = fxstream.compile(vnet(ndim)().eval(), tile_size=1024)
    assert smodel.plan.boundary == "out_tr_conv2" and smodel.plan.stride == (1,) * ndim


# --- torch.stack and a reduction over the new dim ----------------------------------------


def without_group_norm(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with every GroupNorm replaced by Identity (global until statistics passes land)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def small_fpn():
    import segmentation_models_pytorch as smp

    return smp.FPN(
        "tu-resnet10t",
        encoder_weights=None,
        encoder_depth=3,
        classes=2,
        decoder_pyramid_channels=32,
        decoder_segmentation_channels=32,
    )


def test_fpn_merge_streams_whole(schedule):
    """smp FPN's merge block, torch.stack(x).sum(dim=0), streams; its GroupNorms are replaced
    (they are global statistics), so the whole model streams, the 4x upsampling head included."""
    smodel = streams_exactly(build(lambda: without_group_norm(small_fpn())), None, margin=(10, 6), multiple=8)
    assert smodel.plan.stride == (0.25, 0.25)
    assert any(n.target is torch.stack for n in smodel.program().analysis.trunk)


def test_skresnet_streams_to_its_selective_kernel_attention(schedule):
    """skresnet stacks its kernel paths (local) and weighs them with a softmax over pooled
    features (global): the rejection names that pooling, and the suggestion streams the stack."""
    model = build(tm("skresnet18"))
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=512)
    message = str(info.value)
    assert "squeeze-excitation:" in message and "'layer1.0.conv1.attn'" in message, message
    smodel = streams_exactly(model, info.value.boundary, margin=(20, 14))
    assert any(n.target is torch.stack for n in smodel.program().analysis.trunk)


# --- space-to-depth as view/permute/view ---------------------------------------------------


def test_tresnet_space_to_depth_streams(schedule):
    """TResNet's stem is space-to-depth written as view/permute/view (a window of extent
    and stride 4); its first squeeze-excitation is in layer1, so the prefix before it streams."""
    model = build(tm("tresnet_m"))
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=512)
    assert "squeeze-excitation:" in str(info.value) and "body.layer1.0.se" in str(info.value)
    smodel = streams_exactly(model, info.value.boundary, margin=(20, 12), multiple=32)
    steps = smodel.program().geometry.steps
    assert next(s for s in steps if s.module_path == "body.s2d").kind == "space_to_depth"


# --- suggestions that compile ----------------------------------------------------------------


def test_resnest_suggestion_streams(schedule):
    """resnest's split attention reads ``B, RC, H, W = x.shape`` of its convolution: the
    suggested prefix (which ends before the attention's pooling) compiles and streams."""
    model = build(tm("resnest14d"))
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=512)
    assert "squeeze-excitation:" in str(info.value)
    streams_exactly(model, info.value.boundary, margin=(20, 12))


def suggestion(model) -> tuple[str, list[str]]:
    """The suggested boundary of the model's rejection, and the other trunk outputs it names."""
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(model, tile_size=4096)
    message = str(info.value)
    others = re.findall(r"'(\w+)'", message.split("it also streams ")[1]) if "it also streams" in message else []
    return info.value.boundary, others


def small_upernet():
    import segmentation_models_pytorch as smp

    return smp.UPerNet("tu-resnet10t", encoder_weights=None, classes=2, decoder_channels=32)


# name -> (factory, the suggested boundary, its trunk outputs)
SUGGESTIONS = {
    # the FPN's top-down path streams; its level blocks hold GroupNorm
    "smp.FPN": (small_fpn, "decoder.p2", 4),
    # the pyramid pooling module is global; the encoder streams with its four outputs
    "smp.UPerNet": (small_upernet, "encoder", 4),
}


@pytest.mark.parametrize("name", sorted(SUGGESTIONS))
def test_suggestion_streams_every_output_it_names(schedule, name):
    """The largest prefix is not cut at the first skip: the suggested boundary streams the
    encoder (and an FPN's top-down path) with several outputs, exactly those the message names."""
    factory, expected, count = SUGGESTIONS[name]
    model = build(factory)
    boundary, others = suggestion(model)
    assert boundary == expected
    smodel = streams_exactly(model, boundary, margin=(12, 4), multiple=32)
    outputs = smodel.program().geometry.outputs
    assert len(outputs) == count and list(outputs[:-1]) == others


@pytest.mark.parametrize("name", ["timm.rexnet_100", "timm.efficientnet_b0", "timm.skresnet18"])
def test_also_streams_lists_the_compiled_outputs(name):
    """The outputs the suggestion names are those its compiled plan has (size queries of
    earlier maps, such as rexnet's and efficientnet's, do not make outputs)."""
    model = tm(name.split(".")[1])().eval()
    boundary, others = suggestion(model)
    outputs = fxstream.compile(model, tile_size=4096, boundary=boundary).program().geometry.outputs
    assert list(outputs[:-1]) == others


# --- trace gaps ---------------------------------------------------------------------------------


def flexible_unet(backbone: str):
    from monai.networks.nets import FlexibleUNet

    return lambda: FlexibleUNet(3, 2, backbone, pretrained=False, norm="batch", decoder_channels=(8, 8, 8, 8, 8))


@pytest.mark.parametrize("backbone", ["resnet18", "resnet34"])
def test_flexible_unet_zero_padded_shortcut_traces(backbone):
    """MONAI's resnet18/34 shortcut, torch.cat([out.data, torch.zeros(out.size(0), c,
    *out.shape[2:])], 1), traces, and the whole model streams."""
    smodel = fxstream.compile(flexible_unet(backbone)().eval(), tile_size=1024)
    assert smodel.plan.stride == (1, 1) and smodel.plan.boundary == "segmentation_head_2"


def test_flexible_unet_shortcut_streams(schedule):
    """The encoder up to its first zero-padded shortcut (layer2's first block), exactly."""
    smodel = streams_exactly(build(flexible_unet("resnet18")), "encoder.layer2.0", margin=(20, 12), multiple=32)
    assert any(s.op == "sized" for s in smodel.program().geometry.steps)


def test_highresnet_streams_whole(schedule):
    """MONAI HighResNet: torch.as_tensor on traced tensors, and ChannelPad's F.pad of channels."""
    from monai.networks.nets import HighResNet

    streams_exactly(build(lambda: HighResNet(2, 1, 2)), None, margin=(20, 12), channels=1)


def test_segformer_traces_and_streams(schedule):
    """smp's mix transformer makes torch.empty([B, 0, H // 2, W // 2]) and its decoder branches on
    its channel count: the head checks that branch on every call. The patch embedding streams."""
    import segmentation_models_pytorch as smp

    smodel = streams_exactly(
        build(lambda: smp.Segformer("mit_b0", encoder_weights=None, classes=2)), None, (25, 25), multiple=32
    )
    assert smodel.plan.boundary == "encoder_patch_embed1_proj"


def test_unknown_op_does_not_hide_skresnet_attention(monkeypatch):
    """With torch.stack unknown again (as before it had a row), the rejection at it also names
    the selective-kernel attention further on, the op that really stops streaming there."""
    from fxstream.ops import table as ops

    monkeypatch.delitem(ops.FUNCTIONS, torch.stack)
    with pytest.raises(fxstream.UnsupportedOpError) as info:
        fxstream.compile(tm("skresnet18")().eval(), tile_size=512)
    first, further = str(info.value).split("further on")
    assert "does not know whether function torch.stack is local" in first
    assert "squeeze-excitation:" in further and "layer1.0.conv1.attn" in further


# --- the trace's sample size -------------------------------------------------------------------


def test_vgg16_streams_at_224_pixels_and_more():
    """timm vgg16's head pools the features to 7x7 only below 224 pixels; traced on the
    64-pixel probe, the compiled module traces again at the first larger size it meets."""
    torch.manual_seed(0)
    model = timm.create_model("vgg16", pretrained=False, num_classes=10, mlp_ratio=1 / 64).eval()
    smodel = fxstream.compile(model, tile_size=512)
    with torch.no_grad():
        for size in (224, 256):
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(smodel(x), model(x), rtol=1e-4, atol=1e-5)
    assert "pre_logits_fc1" in {s.name for s in smodel.program().geometry.steps}  # the 7x7 conv streams
