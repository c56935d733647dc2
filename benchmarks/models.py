"""The benchmark models: a torchvision ResNet trunk (conv1..layer4, BatchNorm in eval mode)
with an average-pool + linear head, and how each method splits it.

Every method gets the same network for the same architecture (fixed seed), with the
BatchNorm statistics and affine parameters randomised a little (as in examples/demo.py)
so that every gradient is non-trivial. The trunk is an ``nn.Sequential`` with
torchvision's names (``trunk.conv1`` ... ``trunk.layer4``), so that ``checkpoint_sequential``
and lightstream can take a prefix of it and fxstream can be given ``boundary="trunk.layer2"``.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torchvision
from torch import nn

ARCHS = {"resnet18": torchvision.models.resnet18, "resnet34": torchvision.models.resnet34}
TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
CLASSES = 10


class Net(nn.Module):
    """``trunk`` (conv1..layer4) -> adaptive average pool -> flatten -> linear."""

    def __init__(self, resnet: nn.Module, classes: int = CLASSES):
        super().__init__()
        self.trunk = nn.Sequential(OrderedDict((name, getattr(resnet, name)) for name in TRUNK))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(resnet.fc.in_features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.trunk(x)), 1))


def build(arch: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Net:
    """The benchmark network for ``arch`` (same weights every call), in eval mode."""
    torch.manual_seed(0)
    net = Net(ARCHS[arch](weights=None))
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return net.eval().to(device=device, dtype=dtype)


def split(net: Net, upto: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(streamed part, rest of the trunk): the trunk children up to and including ``upto``,
    and the ones after it. Both share ``net``'s modules."""
    names = list(net.trunk._modules)
    k = names.index(upto) + 1
    head = nn.Sequential(OrderedDict((n, net.trunk._modules[n]) for n in names[:k]))
    tail = nn.Sequential(OrderedDict((n, net.trunk._modules[n]) for n in names[k:]))
    return head, tail


def flat_blocks(seq: nn.Sequential) -> list[nn.Module]:
    """The children of ``seq`` with each ResNet layer expanded into its blocks: the units
    that ``checkpoint_sequential`` may cut between."""
    blocks: list[nn.Module] = []
    for child in seq.children():
        blocks.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return blocks


def without_inplace(net: Net) -> Net:
    """A deep copy of ``net`` whose ReLUs are not in-place (checkpointing recomputes a
    segment from its saved input, which an in-place op at a segment start would overwrite)."""
    net = copy.deepcopy(net)
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return net
