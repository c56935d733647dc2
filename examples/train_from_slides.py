"""Train a streamed classifier straight from pyramidal TIFF "slides", never loading one whole.

The script writes synthetic slides with tifffile: RGB uint8 noise with one bright square;
in a positive slide the square carries a 1-pixel checkerboard, in a negative it is flat
with the same mean. Each file is a tiled pyramid (level k averages 2^k x 2^k pixels), so
the label is visible only at level 0: from level 1 up, both kinds of square are identical.

Training reads the files through ``fxstream.SlideDataset`` (each sample a lazy
``fxstream.open_image`` handle) and a ``DataLoader`` with ``fxstream.slides.collate``;
``fxstream.train_step`` streams each slide tile by tile, reading each tile's region from
the file when it is needed. The script prints the validation accuracy, the time per step
and the peak resident memory of the process against the size of the slides.

    python examples/train_from_slides.py --quick        # a few seconds
    python examples/train_from_slides.py                # 4096 x 4096 slides
    python examples/train_from_slides.py --level 1      # the same at level 1: chance
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream
from fxstream import slides

MEAN, NOISE, BRIGHT, CHECKER = 90, 16, 40, 30  # grey levels of the synthetic slides (never clipped in practice)


class Detector(nn.Module):
    """Patch convolutions, a 3x3 layer, global max and mean pooling, linear."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.conv = nn.Conv2d(8, width, 2, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.mix = nn.Conv2d(width, width, 3, padding=1)
        self.fc = nn.Linear(2 * width, 1)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(F.relu(self.patch(x)))))
        x = F.relu(self.mix(x))
        pooled = torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)
        return self.fc(pooled.flatten(1)).squeeze(1)


def make_slide(rng: np.random.Generator, size: int, positive: bool, obj: int) -> np.ndarray:
    """One (size, size) uint8 grey plane (written as RGB): noise plus a bright square at
    even coordinates, textured (a +-CHECKER checkerboard) in positives. Averaging 2x2
    blocks maps both kinds of square to the same values."""
    plane = rng.normal(MEAN, NOISE, (size, size)).astype(np.float32)
    r, c = rng.integers(0, (size - obj) // 2, 2) * 2
    i, j = np.meshgrid(np.arange(obj), np.arange(obj), indexing="ij")
    checker = ((i + j) % 2 * 2 - 1) * CHECKER if positive else 0
    plane[r : r + obj, c : c + obj] += BRIGHT + checker
    return np.clip(np.rint(plane), 0, 255).astype(np.uint8)


def pyramid(plane: np.ndarray, levels: int) -> list[np.ndarray]:
    """Level k: the mean of 2^k x 2^k blocks (rounded), as a slide scanner's pyramid."""
    out = [plane]
    for _ in range(levels - 1):
        h, w = out[-1].shape[0] // 2 * 2, out[-1].shape[1] // 2 * 2
        x = out[-1][:h, :w].reshape(h // 2, 2, w // 2, 2).mean((1, 3), dtype=np.float32)
        out.append(np.rint(x).astype(np.uint8))
    return out


def write_slide(path: pathlib.Path, plane: np.ndarray, levels: int, tile: int) -> None:
    """A tiled pyramidal RGB TIFF (levels in SubIFDs) of a grey plane."""
    import tifffile

    pages = pyramid(plane, levels)
    with tifffile.TiffWriter(path, bigtiff=3 * plane.nbytes > 2**31) as tw:
        options = dict(tile=(tile, tile), photometric="rgb", compression="zlib")
        for k, page in enumerate(pages):
            extra = dict(subifds=len(pages) - 1) if k == 0 else dict(subfiletype=1)
            tw.write(np.repeat(page[..., None], 3, axis=2), **options, **extra)


def write_slides(folder: pathlib.Path, count: int, seed: int, args) -> list[tuple[pathlib.Path, int]]:
    rng = np.random.default_rng(seed)
    items = []
    for k in range(count):
        label = k % 2
        path = folder / f"slide-{seed}-{k}.tif"
        write_slide(path, make_slide(rng, args.size, bool(label), args.object_size), args.levels, args.file_tile)
        items.append((path, label))
    return items


def accuracy(smodel: nn.Module, loader) -> float:
    smodel.eval()
    correct = total = 0
    with torch.no_grad():
        for images, labels in loader:
            logits = torch.cat([smodel(image) for image in images])
            correct += int(((logits > 0).long() == labels).sum())
            total += len(labels)
    smodel.train()
    return correct / total


def peak_rss() -> int:
    """The process's peak resident set size in bytes (ru_maxrss: KiB on Linux, bytes on macOS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def loader(items, args, shuffle: bool, seed: int = 0):
    dataset = fxstream.SlideDataset(items, level=args.level)
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        dataset,
        args.batch,
        shuffle=shuffle,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
        collate_fn=slides.collate,  # a list of lazy slides (one micro-batch each) and a label tensor
        generator=generator,
    )


def train(args, folder: pathlib.Path) -> dict:
    start = time.perf_counter()
    train_items = write_slides(folder, args.slides, args.seed, args)
    val_items = write_slides(folder, args.val, args.seed + 1, args)
    file_bytes = sum(os.path.getsize(p) for p, _ in train_items + val_items)
    pixel_bytes = 3 * args.size**2 * (args.slides + args.val)
    print(f"wrote {args.slides} + {args.val} slides of {args.size}x{args.size} in {time.perf_counter() - start:.1f} s")
    rss_before = peak_rss()
    torch.manual_seed(args.seed)
    model = Detector(args.width)
    smodel = fxstream.compile(model, tile_size=args.tile, input_transform=fxstream.Normalize(MEAN, 2 * NOISE))
    height, width = fxstream.open_image(train_items[0][0], args.level).shape[2:]
    print(f"level {args.level}: {height}x{width} px, {len(smodel.shape_plan(height, width).tiles)} tiles per slide")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    step, seconds, history = 0, 0.0, []
    train_loader, val_loader = loader(train_items, args, True, args.seed), loader(val_items, args, False)
    while step < args.steps:
        for images, labels in train_loader:
            tick = time.perf_counter()
            loss = fxstream.train_step(smodel, optimizer, F.binary_cross_entropy_with_logits, images, labels.float())
            seconds += time.perf_counter() - tick
            step += 1
            if step % args.eval_every == 0 or step == args.steps:
                acc = accuracy(smodel, val_loader)
                history.append((step, loss.item(), acc))
                print(f"step {step:4d}  loss {loss.item():.3f}  val acc {acc:.3f}", flush=True)
            if step == args.steps:
                break
    result = {
        "accuracy": history[-1][2],
        "history": history,
        "seconds_per_step": seconds / args.steps,
        "peak_rss_before": rss_before,
        "peak_rss": peak_rss(),
        "file_bytes": file_bytes,
        "pixel_bytes": pixel_bytes,
    }
    print(
        f"final val accuracy {result['accuracy']:.3f}; {result['seconds_per_step']:.2f} s per step of {args.batch} "
        f"slides; peak RSS {rss_before / 2**20:.0f} MiB before training, {result['peak_rss'] / 2**20:.0f} MiB "
        f"after, for {len(train_items) + len(val_items)} slides of {pixel_bytes / 2**20:.0f} MiB of pixels "
        f"({file_bytes / 2**20:.0f} MiB of files)"
    )
    return result


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small slides, a few seconds")
    p.add_argument("--size", type=int, default=4096, help="slide edge at level 0, in pixels")
    p.add_argument("--level", type=int, default=0, help="the pyramid level to train on (1+: the label is gone)")
    p.add_argument("--levels", type=int, default=3, help="pyramid levels written")
    p.add_argument("--file-tile", type=int, default=256, help="the TIFF files' tile edge")
    p.add_argument("--object-size", type=int, default=32)
    p.add_argument("--slides", type=int, default=32, help="training slides")
    p.add_argument("--val", type=int, default=16, help="validation slides")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tile", type=int, default=1024, help="fxstream tile_size")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-2)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--workers", type=int, default=1, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default="", help="where to write the slides (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.quick:
        args.size, args.levels, args.file_tile, args.object_size = 256, 2, 64, 16
        args.slides, args.val, args.steps, args.tile, args.eval_every = 16, 16, 20, 96, 10
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.dir:
        pathlib.Path(args.dir).mkdir(parents=True, exist_ok=True)
        return train(args, pathlib.Path(args.dir))
    with tempfile.TemporaryDirectory() as folder:
        return train(args, pathlib.Path(folder))


if __name__ == "__main__":
    main()
