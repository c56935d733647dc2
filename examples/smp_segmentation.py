"""Segment a large image with a segmentation_models_pytorch U-Net, streamed tile by tile.

The task is synthetic (no downloads): thin bright lines (a stand-in for vessels or roads)
drawn over smooth noise; the target is the per-pixel line mask. The whole smp U-Net
(encoder, decoder with its skips, segmentation head) is local, so ``fxstream.compile``
streams all of it: every step runs the network on the whole image tile by tile, the loss is
computed on the assembled full-resolution output, and the gradients are those of
whole-image training. smp's input-size check (``check_input_shape``) is answered at trace
time from a sample input; the image size must be a multiple of the encoder's output stride,
as for the plain model. BatchNorm stays in eval mode (frozen statistics, trainable affine).

Before training, the example checks the streamed model against the plain one on one image:
the output and every parameter gradient agree to float32 rounding.

Usage: python examples/smp_segmentation.py [--encoder NAME] [--depth D] [--size N]
       [--tile-size T] [--steps S] [--quick]
"""

from __future__ import annotations

import argparse
import time

import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F

import fxstream

DEFAULTS = {"encoder": "resnet18", "depth": 5, "size": 1536, "tile_size": 1024, "steps": 6}
QUICK = {"encoder": "tu-resnet10t", "depth": 3, "size": 256, "tile_size": 192, "steps": 4}


def make_sample(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """An image (1, 3, size, size) and its mask (1, size, size): lines over smooth noise."""
    noise = torch.randn(1, 3, size + 4, size + 4, generator=gen)
    image = F.avg_pool2d(noise, 5, stride=1)
    image = image / image.std()
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    mask = torch.zeros(size, size, dtype=torch.bool)
    for _ in range(max(2, size // 64)):
        angle = torch.rand(1, generator=gen).item() * 3.1416
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        distance = ((yy - cy) * torch.cos(torch.tensor(angle)) - (xx - cx) * torch.sin(torch.tensor(angle))).abs()
        mask |= distance < 1.5
    image[0, :, mask] += 2.0
    return image, mask.long().unsqueeze(0)


def gradient_check(model: torch.nn.Module, smodel: torch.nn.Module, image: torch.Tensor) -> float:
    """Largest relative difference between streamed and plain outputs and gradients."""
    results = []
    for net in (model, smodel):
        model.zero_grad()
        out = net(image)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    model.zero_grad()
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item() for a, b in zip(*results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--encoder")
    parser.add_argument("--depth", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--tile-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a small image and a shallow encoder, in seconds")
    args = parser.parse_args()
    config = dict(QUICK if args.quick else DEFAULTS)
    config.update({k: v for k, v in vars(args).items() if k in config and v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    decoder = tuple(16 * 2**i for i in reversed(range(config["depth"])))
    model = smp.Unet(
        config["encoder"], encoder_weights=None, encoder_depth=config["depth"], decoder_channels=decoder, classes=2
    ).eval()
    smodel = fxstream.compile(model, tile_size=config["tile_size"])
    size = config["size"]
    tiles = len(smodel.shape_plan(size, size).tiles)
    print(
        f"smp.Unet({config['encoder']}, depth {config['depth']}): the whole model streams, "
        f"{size}x{size} image in {tiles} tiles of {config['tile_size']} px"
    )

    gen = torch.Generator().manual_seed(1)
    error = gradient_check(model, smodel, make_sample(size, gen)[0])
    print(f"streamed vs plain, output and gradients: max relative difference {error:.1e}")

    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    weight = torch.tensor([1.0, 10.0])  # the lines are a few percent of the pixels
    print(" step     loss   time")
    for step in range(1, config["steps"] + 1):
        image, mask = make_sample(size, gen)
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(smodel(image), mask, weight=weight)
        loss.backward()
        optimizer.step()
        print(f"{step:5d} {loss.item():8.4f} {time.perf_counter() - start:5.1f}s")
    print(f"streaming work so far: {smodel.last_stats}")


if __name__ == "__main__":
    main()
