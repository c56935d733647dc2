"""One training step on a large RGB uint8 image, in a fresh process: the rise of the peak
resident set size (RSS) over the resident size before the step, and the step's time.

    python tests/slides_rss.py --source memmap --path image.u8 --size 20000

``--source``: ``memmap`` (a raw (1, 3, size, size) uint8 file as ``np.memmap``), ``tiff``
(a tiled TIFF of the same pixels, written next to it, read with ``fxstream.open_image``), or
``tensor`` (the file loaded into a host tensor before the baseline). Prints one JSON line.
The peak is ``VmHWM`` after resetting it through ``/proc/self/clear_refs``; a warm-up step
on a small image runs first so that code pages and allocator pools are not counted.
tests/test_slides.py runs it; the figures are quoted in docs/slides.md.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxstream


class Net(nn.Module):
    """Patch convolution (8x8, stride 8), max pool 4, 3x3 convolution, global max, linear."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 8, stride=8)
        self.pool = nn.MaxPool2d(4)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        x = F.relu(self.conv(self.pool(F.relu(self.patch(x)))))
        return self.fc(F.adaptive_max_pool2d(x, 1).flatten(1))


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def image(args):
    shape = (1, 3, args.size, args.size)
    raw = np.memmap(args.path, dtype=np.uint8, mode="r", shape=shape)
    if args.source == "memmap":
        return raw
    if args.source == "tensor":
        return torch.from_numpy(np.fromfile(args.path, dtype=np.uint8).reshape(shape))
    import tifffile

    tiff = args.path + ".tif"
    with tifffile.TiffWriter(tiff, bigtiff=True) as tw:
        tiles = (
            raw[0, :, y : y + 512, x : x + 512].transpose(1, 2, 0)
            for y in range(0, args.size, 512)
            for x in range(0, args.size, 512)
        )
        tw.write(tiles, shape=(args.size, args.size, 3), dtype=np.uint8, tile=(512, 512), photometric="rgb")
    return fxstream.open_image(tiff)


def step(smodel, optimizer, x) -> tuple[float, float]:
    """Wall and CPU seconds (all threads, user + system) of one training step."""
    wall, cpu = time.perf_counter(), time.process_time()
    fxstream.train_step(smodel, optimizer, F.cross_entropy, x, torch.tensor([1]))
    return time.perf_counter() - wall, time.process_time() - cpu


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--source", choices=["memmap", "tiff", "tensor"], required=True)
    p.add_argument("--path", required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--tile", type=int, default=2048)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = Net()
    smodel = fxstream.compile(model, tile_size=args.tile, input_transform=fxstream.Normalize(scale=1 / 255))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    step(smodel, optimizer, np.zeros((1, 3, args.tile + 100, args.tile + 100), dtype=np.uint8))  # warm-up
    x = image(args)
    baseline = status_kib("VmRSS") * 1024
    reset_peak()
    wall, cpu = step(smodel, optimizer, x)
    peak = status_kib("VmHWM") * 1024
    result = {
        "source": args.source,
        "image_bytes": 3 * args.size * args.size,
        "tile_size": args.tile,
        "tiles_per_pass": len(smodel.shape_plan(args.size, args.size).tiles),
        "rss_before_bytes": baseline,
        "peak_rise_bytes": peak - baseline,
        "step_seconds": round(wall, 2),
        "step_cpu_seconds": round(cpu, 2),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
