"""Measured vs predicted training-step ratio of models with global statistics (issue 20).

For each case: the time of one training step (forward, then backward of ``out.sum()``) of the
plain model and of the streamed one, float32, one CPU thread, measured back to back
``REPEATS`` times after a warm-up (the machine may be shared: the ratio is the median of the
pairs' ratios); against ``fxstream plan``'s ``predicted_step_ratio`` (the schedule's ratio
times ``sum_v F_v (1 + u_v) / sum_v F_v``, with measured FLOPs per node).

Cases:

* a GroupNorm toy (conv -> GN -> conv -> GN -> conv, 32 channels, two levels) at 1024 px,
  carry, 16 tiles;
* torchvision ``deeplabv3_resnet50`` (random weights, eval BatchNorm, ASPP's image pooling:
  one level) at 256 px, carry (one tile: its 1056 px receptive field leaves smaller cells
  empty) and recompute (2 x 2 tiles: the plan's uniform blocks, as the tests force them; each
  tile reads the whole image, its receptive field being larger).

With one tile the output pass keeps its only tile's graph and does not recompute it, so a
step costs less than the 4/3 per pass the prediction assumes.

Usage: python benchmarks/stats_ratio.py   (about 10 minutes on one core)
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import fxstream
from fxstream.cli.report import build
from fxstream.planning import plan as planner

torch.set_num_threads(1)
REPEATS = 5
SPLITS = planner._splits


class GNToy(nn.Module):
    def __init__(self, c: int = 32):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, c, 3, padding=1), nn.GroupNorm(4, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c)
        self.c3 = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        return self.c3(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))


class Out(nn.Module):
    """deeplabv3's output dict -> its 'out' tensor."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x)["out"]


def step_time(model, x) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    out = model(x)
    out = out["out"] if isinstance(out, dict) else out
    out.sum().backward()
    return time.perf_counter() - start


def case(name: str, model: nn.Module, shape: tuple, tile: int, schedule: str, uniform: bool = False) -> dict:
    torch.manual_seed(0)
    x = torch.randn(*shape)
    if uniform:  # the plan's uniform blocks (tests/conftest.py uniform_tiles)
        planner._splits = lambda geo, plan, sizes: planner.plan_splits(plan, sizes[geo.output])
    smodel = fxstream.compile(model, tile_size=tile, schedule=schedule)
    report = build(smodel, shape)
    step_time(model, x), step_time(smodel, x)  # warm-up
    pairs = [(step_time(model, x), step_time(smodel, x)) for _ in range(REPEATS)]
    planner._splits = SPLITS
    plain = statistics.median(p for p, _ in pairs)
    streamed = statistics.median(s for _, s in pairs)
    result = {
        "case": name,
        "schedule": schedule,
        "tiles": report["num_tiles"],
        "levels": report["statistics"]["levels"],
        "plain_s": plain,
        "streamed_s": streamed,
        "measured_ratio": statistics.median(s / p for p, s in pairs),
        "predicted_ratio": report["predicted_step_ratio"],
    }
    print(
        f"{name:<28} {schedule:<9} {result['tiles']:>3} tiles, {result['levels']} levels: plain {plain:6.2f} s, "
        f"streamed {streamed:6.2f} s, measured {result['measured_ratio']:.2f}x, "
        f"predicted {result['predicted_ratio']:.2f}x",
        flush=True,
    )
    return result


def main() -> None:
    case("GroupNorm toy, 1024 px", GNToy().eval(), (1, 3, 1024, 1024), 256, "carry")
    deeplab = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None).eval()
    case("deeplabv3_resnet50, 256 px", deeplab, (1, 3, 256, 256), 512, "carry")
    case("deeplabv3_resnet50, 256 px", deeplab, (1, 3, 256, 256), 1056 + 127, "recompute", uniform=True)


if __name__ == "__main__":
    main()
