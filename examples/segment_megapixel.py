"""Segmentation at full resolution: train a U-Net on whole megapixel images, streamed.

The task is synthetic (no downloads): small elliptical blobs filled with a striped
texture, in a background of smooth noise of the same brightness. Only local texture tells
them apart, and the target is the per-pixel mask of the blobs.

The model is the standard 4-level U-Net of milesial/Pytorch-UNet (double 3x3 conv +
BatchNorm + ReLU per level, max-pool down, ConvTranspose(k=2, s=2) up, ``F.pad`` of the
upsampled map to the skip's size, concatenated skips). ``fxstream.compile`` makes the
whole network the streamed trunk: every training step runs it on the whole image, tile by
tile, and the loss (pixel-wise cross-entropy + Dice) is computed on the assembled
full-resolution output. The gradients are those of whole-image training (exact up to
float rounding; see tests/test_dense.py), while only one tile's activations are alive.

BatchNorm stays in eval mode (frozen statistics, trainable affine): the statistics of a
whole image cannot be computed tile by tile.

Prints the loss and the IoU on a held-out image during training, and saves a picture of
the held-out image, its true mask and the predicted mask (matplotlib if installed, else
a binary PGM file) as segment_megapixel.png in the folder --out (default: a new temporary
folder), and prints its path.

Usage: python examples/segment_megapixel.py [--size N] [--tile-size T] [--steps S] [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream

DEFAULTS = {"size": 1024, "tile_size": 768, "steps": 40, "base": 4, "eval_every": 5}
# Blobs cover about 8% of the pixels: weigh them up in the cross-entropy.
CLASS_WEIGHT = torch.tensor([1.0, 5.0])
QUICK = {"size": 384, "tile_size": 320, "steps": 24, "base": 4, "eval_every": 6}


# --- Data ----------------------------------------------------------------------------------


def make_sample(size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One image (1, 1, size, size) and its mask (1, size, size) of 0/1 labels.

    Background: white noise smoothed by a 5x5 box filter (low frequencies only),
    rescaled to unit variance. Blobs: ellipses of 6..16 pixels radius with stripes of a
    random orientation and a period of 3..5 pixels, plus a little white noise; about 250
    blobs per megapixel.
    """
    noise = torch.randn(1, 1, size + 4, size + 4, generator=gen)
    image = F.avg_pool2d(noise, 5, stride=1)
    image = image / image.std()
    mask = torch.zeros(size, size, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    count = max(1, round(250 * (size / 1024) ** 2))
    for _ in range(count):
        cy, cx = (torch.rand(2, generator=gen) * size).tolist()
        ry, rx = (6 + 10 * torch.rand(2, generator=gen)).tolist()
        angle, phase = (math.pi * torch.rand(2, generator=gen)).tolist()
        period = 3 + 2 * torch.rand(1, generator=gen).item()
        y0, y1 = max(0, int(cy - ry)), min(size, int(cy + ry) + 1)
        x0, x1 = max(0, int(cx - rx)), min(size, int(cx + rx) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        y, x = yy[y0:y1, x0:x1].float(), xx[y0:y1, x0:x1].float()
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        u = (x * math.cos(angle) + y * math.sin(angle)) * 2 * math.pi / period + phase
        stripes = 1.4 * torch.sin(u) + 0.3 * torch.randn(u.shape, generator=gen)
        patch = image[0, 0, y0:y1, x0:x1]
        patch[inside] = stripes[inside]
        mask[y0:y1, x0:x1] |= inside
    return image, mask.long().unsqueeze(0)


# --- Model (milesial/Pytorch-UNet) ---------------------------------------------------------


class DoubleConv(nn.Sequential):
    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = DoubleConv(cin, cout)

    def forward(self, x1, x2):
        x1 = self.up(x1)
        dy = x2.size()[2] - x1.size()[2]
        dx = x2.size()[3] - x1.size()[3]
        x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        return self.conv(torch.cat([x2, x1], dim=1))


class UNet(nn.Module):
    def __init__(self, in_ch: int = 1, classes: int = 2, base: int = 4):
        super().__init__()
        w = [base * 2**i for i in range(5)]
        self.inc = DoubleConv(in_ch, w[0])
        self.downs = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), DoubleConv(w[i], w[i + 1])) for i in range(4))
        self.ups = nn.ModuleList(Up(w[i + 1], w[i]) for i in reversed(range(4)))
        self.outc = nn.Conv2d(w[0], classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        y = skips.pop()
        for up in self.ups:
            y = up(y, skips.pop())
        return self.outc(y)


# --- Loss and metric -----------------------------------------------------------------------


def dice_loss(logits: torch.Tensor, mask: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the foreground class."""
    prob = logits.softmax(1)[:, 1]
    target = mask.to(prob.dtype)
    return 1 - (2 * (prob * target).sum() + eps) / (prob.sum() + target.sum() + eps)


def iou(pred: torch.Tensor, mask: torch.Tensor) -> float:
    inter = (pred.bool() & mask.bool()).sum().item()
    union = (pred.bool() | mask.bool()).sum().item()
    return inter / union if union else 1.0


# --- Picture -------------------------------------------------------------------------------


def save_picture(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, path: str, zoom: int = 192) -> str:
    """Image | true mask | predicted mask, whole and (below) a ``zoom``-pixel crop of the
    centre at full resolution. Returns the path written (``.pgm``, whole images only,
    without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return _save_pgm(image, truth, pred, os.path.splitext(path)[0] + ".pgm")
    size = image.shape[-1]
    lo = max(0, (size - zoom) // 2)
    crop = (slice(lo, lo + zoom), slice(lo, lo + zoom))
    fig, axes = plt.subplots(2, 3, figsize=(15, 10.4), dpi=100)
    titles = ["image", "true mask", "predicted mask (streamed U-Net)"]
    for row, where in zip(axes, ["", f" (centre {min(zoom, size)} px)"]):
        for ax, data, title, cmap in zip(row, (image, truth, pred), titles, ("gray", "magma", "magma")):
            ax.imshow((data[crop] if where else data).numpy(), cmap=cmap, interpolation="nearest")
            ax.set_title(title + where)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _save_pgm(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor, path: str) -> str:
    lo, hi = image.min(), image.max()
    gray = ((image - lo) / (hi - lo + 1e-12) * 255).round().to(torch.uint8)
    strip = torch.cat([gray, (truth * 255).to(torch.uint8), (pred * 255).to(torch.uint8)], dim=1)
    height, width = strip.shape
    with open(path, "wb") as f:
        f.write(f"P5\n{width} {height}\n255\n".encode())
        f.write(strip.contiguous().numpy().tobytes())
    return path


# --- Training ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, help=f"image edge in pixels (default {DEFAULTS['size']})")
    parser.add_argument("--tile-size", type=int, help=f"input tile edge (default {DEFAULTS['tile_size']})")
    parser.add_argument("--steps", type=int, help=f"training steps, one image each (default {DEFAULTS['steps']})")
    parser.add_argument("--base", type=int, help=f"U-Net width of the first level (default {DEFAULTS['base']})")
    parser.add_argument("--eval-every", type=int, help="steps between IoU evaluations")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--out", metavar="DIR", help="folder for the picture of the held-out prediction (default: a new temporary one)"
    )
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['size']}x{QUICK['size']}, a few steps (< 1 min)")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def picture_path(out: str | None) -> str:
    """Where the picture goes: ``out/segment_megapixel.png`` (``out`` created if missing), or
    in a new temporary folder, never the current directory."""
    folder = out or tempfile.mkdtemp(prefix="fxstream-segment-")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "segment_megapixel.png")


def evaluate(smodel: nn.Module, image: torch.Tensor, mask: torch.Tensor) -> tuple[float, torch.Tensor]:
    with torch.no_grad():
        pred = smodel(image).argmax(1)
    return iou(pred, mask), pred


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    model = UNet(base=args.base).eval()  # BatchNorm with frozen statistics; everything else trains
    smodel = fxstream.compile(model, tile_size=args.tile_size)
    shape_plan = smodel.shape_plan(args.size, args.size)
    print(
        f"U-Net (milesial, 4 levels, base width {args.base}), {sum(p.numel() for p in model.parameters())} "
        f"parameters; image {args.size}x{args.size}, tile {args.tile_size}: {len(shape_plan.tiles)} tiles, "
        f"receptive field {smodel.plan.receptive_field[0]}, halo overhead h={shape_plan.halo_overhead:.2f}"
    )
    held_image, held_mask = make_sample(args.size, torch.Generator().manual_seed(10_000 + args.seed))
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)

    start = time.perf_counter()
    score, _ = evaluate(smodel, held_image, held_mask)
    print(f"{'step':>5} {'loss':>8} {'held-out IoU':>13} {'time':>7}")
    print(f"{0:>5} {'':>8} {score:>13.3f} {time.perf_counter() - start:>6.1f}s")
    for step in range(1, args.steps + 1):
        image, mask = make_sample(args.size, gen)
        logits = smodel(image)  # the whole image, tile by tile
        loss = F.cross_entropy(logits, mask, weight=CLASS_WEIGHT) + dice_loss(logits, mask)
        optimizer.zero_grad()
        loss.backward()  # exact whole-image gradients, tile by tile
        optimizer.step()
        line = f"{step:>5} {loss.item():>8.4f}"
        if step % args.eval_every == 0 or step == args.steps:
            score, pred = evaluate(smodel, held_image, held_mask)
            line += f" {score:>13.3f}"
        else:
            line += f" {'':>13}"
        print(f"{line} {time.perf_counter() - start:>6.1f}s", flush=True)
    elapsed = time.perf_counter() - start
    path = save_picture(held_image[0, 0], held_mask[0], pred[0], picture_path(args.out))
    print(f"final held-out IoU {score:.3f} after {args.steps} steps in {elapsed:.0f}s; picture: {path}")


if __name__ == "__main__":
    main()
