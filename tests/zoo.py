"""Small custom networks that exercise every op fxstream supports in a trunk.

Each entry builds a float64 model in eval mode; together they cover kernels, strides,
paddings, dilations, groups, padding modes, pooling flags, pads, activations in module,
functional and method form, arithmetic with scalars and per-channel tensors,
concatenation, eval BatchNorm, channel LayerNorm, per-pixel Linear, layer scale,
Identity/Dropout in eval mode, conv subclasses and DAGs.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so their gradients matter."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
        if isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))
    return model


class ConvVariety(nn.Module):
    """Non-square kernels, strides that do not divide the size, dilation, groups, depthwise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, (3, 5), stride=(2, 1), padding=(1, 2))
        self.b = nn.Conv2d(8, 8, 3, stride=3, padding=2, dilation=2, groups=4)
        self.c = nn.Conv2d(8, 8, 5, padding=2, groups=8, bias=False)  # depthwise
        self.d = nn.Conv2d(8, 6, (1, 3), stride=(1, 2), padding=0)

    def forward(self, x):
        return self.d(F.relu(self.c(torch.tanh(self.b(F.relu(self.a(x)))))))


class SamePadding(nn.Module):
    """'same' with odd and even kernels (even ones pad asymmetrically) and 'valid'."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 4, padding="same")
        self.b = nn.Conv2d(4, 4, (2, 3), padding="same", dilation=(3, 1))
        self.c = nn.Conv2d(4, 3, 3, padding="valid")

    def forward(self, x):
        return self.c(F.gelu(self.b(F.silu(self.a(x)))))


class PaddingModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
        self.p = nn.Conv2d(4, 4, (5, 3), padding=(2, 1), padding_mode="replicate", stride=2)
        self.z = nn.Conv2d(4, 3, 3, padding=3, padding_mode="zeros", dilation=2)

    def forward(self, x):
        return self.z(F.leaky_relu(self.p(F.relu6(self.r(x))), 0.1))


class Pools(nn.Module):
    """ceil_mode, count_include_pad, divisor_override, dilation; module and functional forms."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.mp = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.ap2 = nn.AvgPool2d((2, 3), stride=(2, 1), padding=(1, 1), count_include_pad=True, divisor_override=5)

    def forward(self, x):
        x = self.mp(self.conv(x))
        x = self.ap(x)
        x = self.ap2(x)
        x = F.max_pool2d(x, 2, 2, 0, 1, True)
        x = F.avg_pool2d(x, 3, 1, 1, False, True)
        return F.max_pool2d(x, 2, stride=1, dilation=2, padding=1)


class PadOps(nn.Module):
    """Asymmetric F.pad in every mode and nn pad modules."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.zpad = nn.ZeroPad2d((0, 2, 1, 0))
        self.rpad = nn.ReflectionPad2d((1, 2, 2, 0))
        self.conv2 = nn.Conv2d(3, 3, (2, 4), stride=2)

    def forward(self, x):
        x = F.pad(x, (2, 0, 1, 3))
        x = self.conv(F.pad(x, (1, 1, 0, 2), mode="reflect"))
        x = F.pad(x, (3, 1, 1, 2), mode="replicate")
        x = F.pad(x, (1, 0, 0, 1), value=0.5)
        return self.conv2(self.rpad(self.zpad(x)))


class Activations(nn.Module):
    """Every listed activation in module, functional and tensor-method form."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mods = nn.ModuleList(
            [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.2), nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), nn.Tanh()]
        )
        self.out = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        x = self.conv(x)
        for m in self.mods:
            x = m(x) * 2.0 - 0.3
        x = F.relu(x) + F.relu6(x) + F.leaky_relu(x, 0.05) + F.gelu(x) + F.silu(x) + F.hardswish(x)
        x = torch.sigmoid(x) + torch.tanh(x) + torch.relu(x) + x.relu() + x.sigmoid() + x.tanh()
        return self.out(x)


class Arithmetic(nn.Module):
    """add/sub/mul with scalars, per-channel tensors and other branches; cat along channels."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 5, padding=2, stride=1)
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))
        self.c = nn.Conv2d(12, 3, 3, stride=2, padding=1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        y = a + b
        y = y - 0.5 * a
        y = y * self.scale + self.shift
        y = torch.add(y, b, alpha=0.3)
        y = torch.mul(y, 1.5).sub(a).add(2.0)
        z = 3.0 - y
        return self.c(torch.cat([y, z * a, b], dim=1))


class BatchNormBlock(nn.Module):
    """conv-BN-ReLU with a residual add, eval-mode BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.3)
        self.id = nn.Identity()

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(self.drop(x)))
        return F.relu(self.id(y) + x)


class ConvNeXtStyle(nn.Module):
    """Depthwise conv, permute, channel LayerNorm, per-pixel Linear, GELU, layer scale."""

    def __init__(self, dim=6):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.randn(dim, 1, 1))

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y))))
        y = y.permute(0, 3, 1, 2)
        x = x + self.gamma * y
        z = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), None, None, 1e-5).permute(0, 3, 1, 2)
        return x + z


class StandardizedConv2d(nn.Conv2d):
    """A Conv2d subclass with its own forward (weight standardisation): must be traced
    into, not flattened to a plain convolution."""

    def forward(self, x):
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        std = w.std(dim=(1, 2, 3), keepdim=True)
        return F.conv2d(x, (w - mean) / (std + 1e-5), self.bias, self.stride, self.padding, self.dilation, self.groups)


class ReflectConv2d(nn.Conv2d):
    """A subclass that pads explicitly before a valid conv (custom padding logic)."""

    def forward(self, x):
        return super().forward(F.pad(x, (2, 0, 0, 2), mode="reflect"))


class Subclasses(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = StandardizedConv2d(3, 4, 3, padding=1, stride=2)
        self.b = ReflectConv2d(4, 4, 3)

    def forward(self, x):
        return self.b(F.relu(self.a(x)))


class BranchyDAG(nn.Module):
    """Branches with different receptive fields and strides merged several times."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.Conv2d(4, 4, 1)
        self.b2 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=4, dilation=2))
        self.b3 = nn.Sequential(nn.MaxPool2d(3, 1, 1), nn.Conv2d(4, 4, (1, 7), padding=(0, 3)))
        self.down = nn.Conv2d(12, 6, 4, stride=2, padding=1)
        self.skip = nn.Conv2d(12, 6, 2, stride=2)
        self.tail = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.stem(x))
        y = torch.cat([self.b1(s), self.b2(s), self.b3(s)], 1)
        z = self.down(y) + self.skip(y)
        return self.tail(F.relu(z)) * torch.sigmoid(self.tail(z))  # tail used twice: shared weights


class Classifier(nn.Module):
    """A trunk followed by a global head: exercises automatic boundary detection."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        f = self.trunk(x)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f, 1), 1) + f.amax(dim=(2, 3))
        return self.fc(pooled)


ZOO = {
    "conv_variety": (ConvVariety, 3),
    "same_padding": (SamePadding, 2),
    "padding_modes": (PaddingModes, 2),
    "pools": (Pools, 2),
    "pad_ops": (PadOps, 2),
    "activations": (Activations, 3),
    "arithmetic": (Arithmetic, 3),
    "batchnorm": (BatchNormBlock, 3),
    "convnext_style": (ConvNeXtStyle, 3),
    "subclasses": (Subclasses, 3),
    "branchy_dag": (BranchyDAG, 2),
    "classifier": (Classifier, 3),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, int]:
    """The zoo model ``name`` in float64 eval mode, and its input channel count."""
    cls, channels = ZOO[name]
    torch.manual_seed(seed)
    return _randomise(cls().double().eval(), seed), channels
