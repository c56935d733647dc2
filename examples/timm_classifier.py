"""Classify whole large images with a timm backbone, streamed tile by tile.

The task is synthetic (no downloads): an image of smooth noise is of class 1 when it holds
a few small checkerboard patches, class 0 otherwise. A patch is a few dozen pixels in an
image of thousands, so the network must see the image at full resolution.

``fxstream.compile`` streams the backbone (everything up to timm's global pooling, or up
to ``--boundary``): the trunk runs tile by tile, the pooling and classifier run on the
assembled feature map, and the gradients are those of whole-image training. BatchNorm
stays in eval mode (frozen statistics, trainable affine). Weights are random
(``pretrained=False``); pass ``--model`` to try another timm CNN.

Before training, the example checks the streamed model against the plain one on one
image: the output and every parameter gradient agree to float32 rounding.

Usage: python examples/timm_classifier.py [--model NAME] [--size N] [--tile-size T]
       [--boundary NAME] [--steps S] [--quick]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

import fxstream

DEFAULTS = {"model": "resnet18", "size": 2048, "tile_size": 1024, "boundary": None, "steps": 6}
QUICK = {"model": "resnet18", "size": 288, "tile_size": 192, "boundary": "layer2", "steps": 4}


def make_image(size: int, label: int, gen: torch.Generator) -> torch.Tensor:
    """(1, 3, size, size): smooth noise, plus 3 checkerboard patches of 24 px if ``label``."""
    noise = torch.randn(1, 3, size + 6, size + 6, generator=gen)
    image = F.avg_pool2d(noise, 7, stride=1)
    image = image / image.std()
    if label:
        board = (torch.arange(24).view(-1, 1) // 3 + torch.arange(24) // 3) % 2 * 3.0 - 1.5
        for _ in range(3):
            y, x = (torch.randint(0, size - 24, (2,), generator=gen)).tolist()
            image[0, :, y : y + 24, x : x + 24] = board
    return image


def gradient_check(model: torch.nn.Module, smodel: torch.nn.Module, image: torch.Tensor) -> float:
    """Largest relative difference between streamed and plain outputs and gradients."""
    worst = 0.0
    results = []
    for net in (model, smodel):
        model.zero_grad()
        out = net(image)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results):
        worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item())
    model.zero_grad()
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--size", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--boundary")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a small image and a short prefix, in seconds")
    args = parser.parse_args()
    config = dict(QUICK if args.quick else DEFAULTS)
    config.update({k: v for k, v in vars(args).items() if k in config and v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    model = timm.create_model(config["model"], pretrained=False, num_classes=2).eval()
    smodel = fxstream.compile(model, tile_size=config["tile_size"], boundary=config["boundary"])
    size = config["size"]
    tiles = len(smodel.shape_plan(size, size).tiles)
    print(
        f"{config['model']}: streamed up to '{smodel.program().analysis.output.name}', "
        f"{size}x{size} image in {tiles} tiles of {config['tile_size']} px"
    )

    gen = torch.Generator().manual_seed(1)
    error = gradient_check(model, smodel, make_image(size, 1, gen))
    print(f"streamed vs plain, output and gradients: max relative difference {error:.1e}")

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    print(" step  label     loss   time")
    for step in range(1, config["steps"] + 1):
        label = step % 2
        image = make_image(size, label, gen)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(smodel(image), torch.tensor([label]))
        loss.backward()
        optimizer.step()
        print(f"{step:5d} {label:6d} {loss.item():8.4f} {time.perf_counter() - start:5.1f}s")
    print(f"streaming work so far: {smodel.last_stats}")


if __name__ == "__main__":
    main()
