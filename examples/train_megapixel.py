"""Train on megapixel images where the label is visible only at full resolution.

Task: each image is a large Gaussian noise field with a small bright square (32x32
pixels in a 2048x2048 image). In a positive image the square carries a fine
checkerboard texture (1-pixel cells); in a negative image it is flat, with the same
mean brightness (``--objects`` adds flat distractor squares). Averaged down by the
``--downsize`` factor, a textured square and a flat one become identical, so the label
is invisible at low resolution: the downsized run cannot beat chance.

Two runs of the same network and the same training budget:

* streamed: ``fxstream.compile`` + ``fxstream.train_step`` on the full-resolution
  images (serial micro-batches, exact gradients);
* downsized: the images average-pooled by ``--downsize`` (as one would to fit
  conventional memory), trained the plain way.

Both learning curves are printed (and plotted to ``--plot`` if matplotlib is present).
Run ``python examples/train_megapixel.py --quick`` for a short version.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream


class Detector(nn.Module):
    """A small fully convolutional detector: patch convolutions, a 3x3 layer, global max."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(1, 8, 4, stride=4)
        self.conv = nn.Conv2d(8, width, 2, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 1)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(F.relu(self.patch(x)))))
        x = F.relu(self.mix(x))
        pooled = torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)
        return self.fc(pooled.flatten(1)).squeeze(1)


def make_image(gen: torch.Generator, size: int, positive: bool, objects: int, obj: int, noise: float) -> torch.Tensor:
    """One (1, 1, size, size) image: unit Gaussian noise plus ``objects`` squares of mean
    +1 at even coordinates; in a positive image the first square is a +-1 checkerboard
    around that mean. Any average pooling by an even factor maps both kinds of square to
    the same values."""
    x = torch.randn(1, 1, size, size, generator=gen) * noise
    i, j = torch.meshgrid(torch.arange(obj), torch.arange(obj), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1).float()
    corners = torch.randint(0, (size - obj) // 2, (objects, 2), generator=gen) * 2
    for k, (r, c) in enumerate(corners.tolist()):
        x[0, 0, r : r + obj, c : c + obj] += 1.0 + (checker if positive and k == 0 else 0.0)
    return x


def make_batch(seed: int, n: int, args) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = [make_image(gen, args.size, bool(y), args.objects, args.object_size, args.noise) for y in labels]
    return torch.cat(images), labels.float()


def downsize(x: torch.Tensor, factor: int) -> torch.Tensor:
    return F.avg_pool2d(x, factor) if factor > 1 else x


def accuracy(model: nn.Module, batches, factor: int) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            logits = torch.cat([model(downsize(x[i : i + 1], factor)) for i in range(len(x))])
            correct += int(((logits > 0).float() == y).sum())
            total += len(y)
    model.train()
    return correct / total


def train(name: str, args, val, streamed: bool) -> list[tuple[int, float, float, float]]:
    torch.manual_seed(args.seed)
    model = Detector(args.width)
    factor = 1 if streamed else args.downsize
    net = fxstream.compile(model, tile_size=args.tile) if streamed else model
    if streamed:
        print(f"[{name}] tiles per {args.size}x{args.size} image: {len(net.shape_plan(args.size, args.size).tiles)}")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = F.binary_cross_entropy_with_logits
    curve = []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = make_batch(args.seed * 100_000 + step, args.batch, args)
        if streamed:
            loss = fxstream.train_step(net, optimizer, loss_fn, x, y, micro_batch_size=args.micro_batch)
        else:
            optimizer.zero_grad()
            loss = loss_fn(net(downsize(x, factor)), y)
            loss.backward()
            optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(net, val, factor)
            elapsed = time.perf_counter() - start
            curve.append((step, loss.item(), acc, elapsed))
            print(f"[{name}] step {step:4d}  loss {loss.item():.3f}  val acc {acc:.3f}  {elapsed:6.1f} s", flush=True)
    return curve


def plot(path: str, curves: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot)")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c[0] for c in curve], [c[2] for c in curve], marker="o", label=name)
    ax.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax.set(xlabel="step", ylabel="validation accuracy", ylim=(0, 1.05))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot saved to {path}")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (about 2 minutes on 2 CPU cores)")
    p.add_argument("--size", type=int, default=2048, help="image edge in pixels")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=2, help="images per streamed forward/backward")
    p.add_argument("--tile", type=int, default=1056, help="fxstream tile_size (1056: 2x2 tiles at 2048)")
    p.add_argument("--downsize", type=int, default=8, help="downsizing factor of the baseline")
    p.add_argument("--objects", type=int, default=1, help="bright squares per image (one textured in positives)")
    p.add_argument("--object-size", type=int, default=32)
    p.add_argument("--noise", type=float, default=0.5, help="noise standard deviation")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--val", type=int, default=32, help="validation images")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--plot", default="", help="save the learning curves to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every = min(args.steps, 30), 10
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"{args.size}x{args.size} images, {args.objects} objects of {args.object_size}px, one textured in "
        f"positives; {args.steps} steps of {args.batch} images; baseline downsized {args.downsize}x to "
        f"{args.size // args.downsize}x{args.size // args.downsize}"
    )
    val = [make_batch(-1 - i, min(8, args.val - 8 * i), args) for i in range((args.val + 7) // 8)]
    curves = {}
    start = time.perf_counter()
    curves[f"streamed {args.size}px"] = train("streamed", args, val, streamed=True)
    curves[f"downsized {args.size // args.downsize}px"] = train("downsized", args, val, streamed=False)
    wall = time.perf_counter() - start
    print("\nfinal validation accuracy:")
    for name, curve in curves.items():
        print(f"  {name:<18} {curve[-1][2]:.3f}  (training time {curve[-1][3]:.0f} s)")
    print(f"total wall time {wall:.0f} s")
    if args.plot:
        plot(args.plot, curves)
    return curves


if __name__ == "__main__":
    main()
