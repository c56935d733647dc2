"""Dense-output networks for the streaming tests: U-Nets (2D, 3D, 1D), FPN decoders,
pixel (un)shuffle, fractional resampling and transposed convolutions.

Every builder in :data:`DENSE` returns a float64 model in eval mode (BatchNorm with
frozen, randomised statistics) whose output has the spatial resolution of a dense map.
Channel counts are small so float64 tests stay fast.

The U-Net's decoder merges an upsampled map with the encoder's skip. At sizes that are
not multiples of ``2**depth`` the two differ by a pixel, and the ``fixup`` argument picks
what the model does about it:

* ``'none'``: nothing (the model only runs at multiples of ``2**depth``);
* ``'pad'``: milesial's Pytorch-UNet, ``F.pad`` of the upsampled map with the size
  difference read from ``x2.size()``;
* ``'crop'``: center-crop of the skip to the upsampled map's size (Ronneberger's U-Net);
* ``'size'``: ``F.interpolate(x, size=skip.shape[2:])`` (only with resampling ups).

The last three read spatial sizes inside the trunk (shape-dependent arguments).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
POOL = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}
UP_CONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
LINEAR_MODE = {1: "linear", 2: "bilinear", 3: "trilinear"}


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so their gradients matter
    and the eval-mode normalisation is not close to the identity."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.num_features, generator=gen) * 0.5 + 1.0)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
    return model


class DoubleConv(nn.Sequential):
    """(conv 3 -> BatchNorm -> ReLU) twice, 'same' padding."""

    def __init__(self, cin: int, cout: int, ndim: int = 2, mid: int | None = None):
        mid = mid or cout
        super().__init__(
            CONV[ndim](cin, mid, 3, padding=1, bias=False),
            NORM[ndim](mid),
            nn.ReLU(inplace=True),
            CONV[ndim](mid, cout, 3, padding=1, bias=False),
            NORM[ndim](cout),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    """Max-pool by 2, then a double conv."""

    def __init__(self, cin: int, cout: int, ndim: int = 2):
        super().__init__(POOL[ndim](2), DoubleConv(cin, cout, ndim))


class Up(nn.Module):
    """Upsample ``x1`` by 2, fit it to the skip ``x2`` (see ``fixup``), concatenate, double conv.

    ``mode`` is 'transpose' (ConvTranspose k=2 s=2 halving the channels) or 'linear'
    (``nn.Upsample`` with (bi/tri)linear interpolation and ``align_corners``, then a 1x1
    conv halving the channels).
    """

    def __init__(self, cin: int, cout: int, ndim: int, mode: str, fixup: str, align_corners: bool = False):
        super().__init__()
        self.ndim, self.fixup, self.mode = ndim, fixup, mode
        if mode == "transpose":
            self.up = UP_CONV[ndim](cin, cin // 2, 2, stride=2)
        elif fixup == "size":
            self.up = CONV[ndim](cin, cin // 2, 1)  # interpolated in forward, to the skip's size
            self.align_corners = align_corners
        else:
            self.up = nn.Sequential(
                nn.Upsample(scale_factor=2, mode=LINEAR_MODE[ndim], align_corners=align_corners),
                CONV[ndim](cin, cin // 2, 1),
            )
        if fixup == "size" and mode == "transpose":
            raise ValueError("fixup='size' needs a resampling up path")
        self.conv = DoubleConv(cin, cout, ndim)

    def forward(self, x1, x2):
        if self.fixup == "size":
            mode = LINEAR_MODE[self.ndim]
            x1 = F.interpolate(self.up(x1), size=x2.shape[2:], mode=mode, align_corners=self.align_corners)
        else:
            x1 = self.up(x1)
        if self.fixup == "pad":  # milesial/Pytorch-UNet
            pad = []
            for dim in reversed(range(2, 2 + self.ndim)):
                diff = x2.size()[dim] - x1.size()[dim]
                pad += [diff // 2, diff - diff // 2]
            x1 = F.pad(x1, pad)
        elif self.fixup == "crop":  # center-crop the skip
            index = [slice(None), slice(None)]
            for dim in range(2, 2 + self.ndim):
                start = (x2.shape[dim] - x1.shape[dim]) // 2
                index.append(slice(start, start + x1.shape[dim]))
            x2 = x2[tuple(index)]
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    """The standard U-Net: ``depth`` levels of max-pool down / upsample up with concatenated
    skips, widths ``base * 2**level``, a 1x1 classifier on the full-resolution map.

    ``up`` is one mode for every level or a sequence of modes, deepest level first.
    """

    def __init__(
        self,
        in_ch: int = 3,
        classes: int = 2,
        base: int = 4,
        depth: int = 4,
        ndim: int = 2,
        up: str | tuple[str, ...] = "transpose",
        fixup: str = "none",
        align_corners: bool = False,
    ):
        super().__init__()
        ups = (up,) * depth if isinstance(up, str) else tuple(up)
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_ch, widths[0], ndim)
        self.downs = nn.ModuleList(Down(widths[i], widths[i + 1], ndim) for i in range(depth))
        self.ups = nn.ModuleList(
            Up(widths[i + 1], widths[i], ndim, mode, fixup, align_corners)
            for i, mode in zip(reversed(range(depth)), ups)
        )
        self.outc = CONV[ndim](widths[0], classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


class FPN(nn.Module):
    """A bottom-up path of stride-2 convs (strides 2..16), 1x1 laterals, a top-down path
    with nearest upsampling and adds, and a dense head back at full resolution.

    ``style='scale'``: ``F.interpolate(p, scale_factor=2, mode='nearest')`` (sizes agree at
    multiples of 16 only). ``style='size'``: torchvision's FeaturePyramidNetwork,
    ``F.interpolate(p, size=lateral.shape[-2:], mode='nearest')`` (any size).
    """

    def __init__(self, in_ch: int = 3, width: int = 4, classes: int = 3, style: str = "scale"):
        super().__init__()
        self.style = style
        chans = [in_ch, 4, 6, 8, 8]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()
            )
            for i in range(4)
        )
        self.laterals = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans[1:])
        self.smooth = nn.Conv2d(width, width, 3, padding=1)
        self.stem = nn.Conv2d(in_ch, width, 3, padding=1)
        self.head = nn.Conv2d(width, classes, 3, padding=1)

    def _up(self, p, like):
        if self.style == "size":
            return F.interpolate(p, size=like.shape[-2:], mode="nearest")
        return F.interpolate(p, scale_factor=2, mode="nearest")

    def forward(self, x):
        feats = []
        y = x
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        p = self.laterals[-1](feats[-1])
        for lateral, feat in zip(reversed(self.laterals[:-1]), reversed(feats[:-1])):
            lat = lateral(feat)
            p = lat + self._up(p, lat)
        p = self.smooth(p)
        full = self.stem(x)
        return self.head(F.relu(full + self._up(p, full)))


class SuperResolution(nn.Module):
    """ESPCN-style: convs at low resolution, PixelShuffle(3) then PixelShuffle(2) at the
    output (stride 1/6: the output is 6x larger than the input per axis)."""

    def __init__(self, in_ch: int = 1):
        super().__init__()
        self.a = nn.Conv2d(in_ch, 6, 5, padding=2)
        self.b = nn.Conv2d(6, 4 * 9, 3, padding=1)
        self.shuffle3 = nn.PixelShuffle(3)
        self.c = nn.Conv2d(4, 4 * in_ch, 3, padding=1)

    def forward(self, x):
        y = self.shuffle3(self.b(torch.tanh(self.a(x))))
        return F.pixel_shuffle(self.c(F.relu(y)), 2)


class Unshuffle(nn.Module):
    """PixelUnshuffle(2) (space to depth) -> convs -> PixelShuffle(2) back, plus a full-res skip."""

    def __init__(self, in_ch: int = 2):
        super().__init__()
        self.down = nn.PixelUnshuffle(2)
        self.a = nn.Conv2d(4 * in_ch, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.up = nn.PixelShuffle(2)
        self.skip = nn.Conv2d(in_ch, 2, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        y = self.up(self.b(F.relu(self.a(self.down(x)))))
        return self.out(torch.cat([y, self.skip(x)], 1))


class Fractional(nn.Module):
    """Resampling by a non-integer factor between convs: scale 1.5 up, then a strided conv."""

    def __init__(self, mode: str = "nearest", align_corners: bool | None = None, scale: float = 1.5):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=scale, mode=mode, align_corners=align_corners)
        self.b = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.b(F.relu(self.up(F.relu(self.a(x)))))


class TransposedVariety(nn.Module):
    """Transposed convolutions with stride 3, non-square kernels, padding, output_padding,
    dilation and groups, as modules and as ``F.conv_transpose2d``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.ConvTranspose2d(4, 6, (3, 4), stride=3, padding=(1, 2), output_padding=(2, 1), groups=2)
        self.c = nn.ConvTranspose2d(6, 4, 3, stride=(2, 1), padding=1, output_padding=(1, 0), dilation=2)
        self.w = nn.Parameter(torch.randn(4, 1, 2, 3) * 0.3)  # groups=4: (in, out/groups, kh, kw)
        self.d = nn.Conv2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        y = self.c(F.relu(self.b(F.relu(self.a(x)))))
        y = F.conv_transpose2d(y, self.w, None, stride=(1, 2), padding=(0, 1), groups=4)
        return self.d(torch.tanh(y))


class Signal1D(nn.Module):
    """A 1D U-Net-like net on a long signal: Conv1d, max and average pooling, linear
    upsampling and ConvTranspose1d with stride 4, and a skip."""

    def __init__(self, in_ch: int = 2, classes: int = 3):
        super().__init__()
        self.a = nn.Conv1d(in_ch, 4, 7, padding=3)
        self.pool = nn.MaxPool1d(2)
        self.b = nn.Conv1d(4, 6, 5, padding=2, dilation=1)
        self.avg = nn.AvgPool1d(4, stride=4)
        self.c = nn.Conv1d(6, 6, 3, padding=2, dilation=2)
        self.up4 = nn.ConvTranspose1d(6, 6, 4, stride=4)
        self.up2 = nn.Upsample(scale_factor=2, mode="linear", align_corners=False)
        self.out = nn.Conv1d(6 + 4, classes, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.a(x))
        b = F.relu(self.b(self.pool(a)))
        c = F.relu(self.c(self.avg(b)))
        y = self.up2(self.up4(c) + b)
        return self.out(torch.cat([y, a], 1))


def _unet2d(**kw) -> Callable[[], nn.Module]:
    return lambda: UNet(in_ch=3, classes=2, base=4, depth=4, **kw)


# name -> (builder, input channels, spatial dims)
DENSE: dict[str, tuple[Callable[[], nn.Module], int, int]] = {
    "unet_pad": (_unet2d(up="transpose", fixup="pad"), 3, 2),
    "unet_crop": (_unet2d(up="transpose", fixup="crop"), 3, 2),
    "unet_x16": (_unet2d(up="transpose", fixup="none"), 3, 2),
    "unet_bilinear": (_unet2d(up="linear", fixup="none", align_corners=False), 3, 2),
    "unet_bilinear_corners": (_unet2d(up="linear", fixup="none", align_corners=True), 3, 2),
    "unet_bilinear_size": (_unet2d(up="linear", fixup="size", align_corners=False), 3, 2),
    "unet_bilinear_pad_corners": (_unet2d(up="linear", fixup="pad", align_corners=True), 3, 2),
    "fpn_scale": (lambda: FPN(style="scale"), 3, 2),
    "fpn_size": (lambda: FPN(style="size"), 3, 2),
    "super_resolution": (SuperResolution, 1, 2),
    "unshuffle": (Unshuffle, 2, 2),
    "fractional_nearest": (lambda: Fractional("nearest"), 2, 2),
    "fractional_nearest_exact": (lambda: Fractional("nearest-exact"), 2, 2),
    "fractional_bilinear": (lambda: Fractional("bilinear", False), 2, 2),
    "fractional_bilinear_corners": (lambda: Fractional("bilinear", True), 2, 2),
    "fractional_bicubic": (lambda: Fractional("bicubic", False), 2, 2),
    "upsample3_bicubic_corners": (lambda: Fractional("bicubic", True, scale=3.0), 2, 2),
    "transposed_variety": (TransposedVariety, 2, 2),
    "unet3d": (lambda: UNet(in_ch=1, classes=2, base=2, depth=2, ndim=3, up=("transpose", "linear")), 1, 3),
    "unet1d": (lambda: UNet(in_ch=2, classes=2, base=3, depth=3, ndim=1, up=("linear", "transpose", "linear")), 2, 1),
    "signal1d": (Signal1D, 2, 1),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, int, int]:
    """The dense model ``name`` in float64 eval mode, its input channels and spatial dims."""
    factory, channels, ndim = DENSE[name]
    torch.manual_seed(seed)
    return randomise(factory().double().eval(), seed), channels, ndim
