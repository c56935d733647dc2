"""One function per benchmarked method: it takes the benchmark network and returns a
:class:`Prepared` whose ``step`` runs one training step (forward + backward of a
cross-entropy loss, batch 1) and whose ``module`` holds the parameters (under the names of
:class:`models.Net`) whose ``.grad`` the step fills.

* ``plain``: autograd on the unmodified network (torchvision's in-place ReLUs).
* ``checkpoint``: ``torch.utils.checkpoint.checkpoint_sequential`` over the streamed part
  of the trunk (cut between ResNet blocks), on a copy with non-in-place ReLUs.
* ``lightstream``: lightstream's ``StreamingCNN`` (PyPI ``lightstream``) over the streamed
  part, built the way lightstream's own ``StreamingResNet`` builds it.
* ``fxstream``: ``fxstream.compile(net, tile_size)`` (``boundary="trunk.<upto>"`` for a prefix).

The forward pass runs under ``autocast`` when one is given; the backward pass outside it,
as in an ordinary training loop.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.methods
    import models
except ImportError:  # pragma: no cover
    from benchmarks import models


@dataclass
class Setting:
    """What a method needs besides the network."""

    upto: str  # last trunk child that is streamed/checkpointed ("layer4": the whole trunk)
    tile: int  # input tile edge (lightstream, fxstream)
    size: tuple[int, int]  # image size, for the fxstream plan figures
    device: str = "cpu"
    autocast: torch.dtype | None = None  # e.g. torch.bfloat16
    segments: int = 8  # checkpoint_sequential segments

    def amp(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device, dtype=self.autocast)


@dataclass
class Prepared:
    step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, target) -> detached output
    module: nn.Module  # parameters named as in models.Net, with the step's gradients
    info: dict = field(default_factory=dict)


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.float(), target)


def plain(net: models.Net, s: Setting) -> Prepared:
    def step(x, target):
        net.zero_grad(set_to_none=True)
        with s.amp():
            out = net(x)
            loss = _loss(out, target)
        loss.backward()
        return out.detach()

    return Prepared(step, net)


def checkpoint(net: models.Net, s: Setting) -> Prepared:
    from torch.utils.checkpoint import checkpoint_sequential

    net = models.without_inplace(net)
    streamed, rest = models.split(net, s.upto)
    blocks = nn.Sequential(*models.flat_blocks(streamed))
    segments = min(s.segments, len(blocks))

    def step(x, target):
        net.zero_grad(set_to_none=True)
        with s.amp():
            features = rest(checkpoint_sequential(blocks, segments, x, use_reentrant=False))
            out = net.fc(torch.flatten(net.pool(features), 1))
            loss = _loss(out, target)
        loss.backward()
        return out.detach()

    return Prepared(step, net, {"segments": segments, "blocks": len(blocks)})


def lightstream(net: models.Net, s: Setting) -> Prepared:
    """StreamingCNN over the streamed part; its forward runs without autograd, the head
    back-propagates to the streamed output, and ``StreamingCNN.backward(image, grad)``
    recomputes the tiles and accumulates the trunk's parameter gradients."""
    from lightstream.core.constructor import StreamingConstructor

    streamed, rest = models.split(net, s.upto)
    # As lightstream's StreamingResNet: BatchNorm kept during its tile statistics, the
    # statistics computed on the CPU. Its constructor moves the model to CUDA when
    # statistics_on_cpu is False and StreamingCNN moves it to CUDA afterwards when True,
    # so on a CPU-only run the flag is switched off once the constructor has run.
    ctor = StreamingConstructor(
        streamed,
        s.tile,
        verbose=False,
        copy_to_gpu=False,
        statistics_on_cpu=True,
        normalize_on_gpu=False,
        add_keep_modules=[nn.BatchNorm2d],
    )
    ctor.statistics_on_cpu = s.device == "cuda"
    with contextlib.redirect_stdout(None):  # its progress messages
        scnn = ctor.prepare_streaming_model()
    # The construction replaced the streamed part's convolutions by lightstream's
    # StreamingConv2d (new parameters, same names and values): gather the live modules.
    module = nn.Module()
    module.trunk = nn.Sequential(OrderedDict([*scnn.stream_module.named_children(), *rest.named_children()]))
    module.pool, module.fc = net.pool, net.fc

    def step(x, target):
        module.zero_grad(set_to_none=True)
        with s.amp():
            features = scnn.forward(x)  # no autograd inside
        features = features.detach().requires_grad_(True)
        with s.amp():
            out = net.fc(torch.flatten(net.pool(rest(features)), 1))
            loss = _loss(out, target)
        loss.backward()
        scnn.backward(x, features.grad)
        return out.detach()

    return Prepared(step, module, lightstream_tiles(scnn, s.size))


def lightstream_tiles(scnn, size: tuple[int, int]) -> dict:
    """lightstream's tile counts for an image, by the formulas of ``StreamingCNN.forward``
    and ``.backward``. Its backward tiles advance by the tile minus the margins where the
    gradient is not valid (``tile_gradient_lost``, about the receptive field per side), so
    a tile not much larger than twice the receptive field needs very many tiles."""
    tile = scnn.tile_shape[2:]
    stride = [int(v) for v in scnn.output_stride[1:]]
    glost, olost = scnn.tile_gradient_lost, scnn.tile_output_lost
    out_tile = scnn._tile_output_shape[2:]
    lost = ((glost.top, glost.bottom), (glost.left, glost.right))
    olost = ((olost.top, olost.bottom), (olost.left, olost.right))
    fwd = bwd = 1
    for n, t, st, (lo, hi), (olo, ohi), otile in zip(size, tile, stride, lost, olost, out_tile):
        if n <= t:
            continue
        valid = (t - lo - hi) // st * st
        bwd *= math.ceil((n - lo - hi) / valid) if valid > 0 else 10**9
        out_n = (n - t) // st + otile
        fwd *= math.ceil(out_n / (otile - olo - ohi))
    return {
        "forward_tiles": fwd,
        "backward_tiles": bwd,
        "gradient_margin": [int(glost.top), int(glost.left), int(glost.bottom), int(glost.right)],
    }


def fxstream(net: models.Net, s: Setting, schedule: str | None = None) -> Prepared:
    """fxstream with its default schedule (carry), or ``schedule``."""
    import fxstream as fx

    boundary = None if s.upto == models.TRUNK[-1] else f"trunk.{s.upto}"
    smodel = fx.compile(net, tile_size=s.tile, boundary=boundary, schedule=schedule)
    shape = smodel.shape_plan(*s.size)
    h = shape.halo_overhead
    info = {
        "tiles": shape.num_tiles,
        "grid": list(shape.grid),
        "h": h,
        "floor_ratio": shape.schedule.step_ratio(h),
        "schedule": shape.schedule.kind,
    }

    def step(x, target):
        net.zero_grad(set_to_none=True)
        with s.amp():
            out = smodel(x)
            loss = _loss(out, target)
        loss.backward()
        return out.detach()

    return Prepared(step, net, info)


METHODS: dict[str, Callable[[models.Net, Setting], Prepared]] = {
    "plain": plain,
    "checkpoint": checkpoint,
    "lightstream": lightstream,
    "fxstream": fxstream,
    "fxstream-recompute": lambda net, s: fxstream(net, s, "recompute"),
    "fxstream-host": fxstream,  # the same; bench.py leaves the image in host memory
}
