"""One image across several processes: tile-parallel streaming of a ResNet-18 step.

Every rank of the tile group gets the same image and runs its band of tile rows; one
all_reduce assembles the trunk output, one sums the trunk gradients, and every rank ends
with the single-process gradients (see ``fxstream.distributed``).

Usage (CPU, gloo; one thread per process)::

    torchrun --nproc-per-node 2 examples/tile_parallel.py --size 1024 --tile-size 512

On GPUs (nccl, one GPU per process)::

    torchrun --nproc-per-node 2 examples/tile_parallel.py --device cuda --size 8192

Run it with one process (``--nproc-per-node 1``, or plain ``python``) for the baseline:
the script prints the median step time of ``--steps`` steps after one warm-up step, and
with ``--check`` the largest gradient difference from a single-process step on rank 0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision

import fxstream


def describe_bands(bands: tuple[int, ...], grid: tuple[int, ...], schedule: str) -> str:
    """What ``bands`` means: the first tile row (axis-0 block) of each rank's band, and the
    rows each rank runs."""
    rows = grid[0]
    ends = [*bands[1:], rows]
    per_rank = "; ".join(
        f"rank {r}: tile rows {lo}-{hi - 1}" if hi - lo > 1 else f"rank {r}: tile row {lo}"
        for r, (lo, hi) in enumerate(zip(bands, ends))
    )
    grid_text = "x".join(str(n) for n in grid)
    line = f"  bands: the first tile row of each rank's band, of {rows} rows ({grid_text} tiles): {per_rank}"
    if schedule == "carry" and len(bands) > 1:
        line += "\n  (each band carries internally; a band after the first recomputes the halo at its first row)"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="image edge in pixels")
    parser.add_argument("--tile-size", type=int, default=512)
    parser.add_argument("--schedule", choices=("carry", "recompute"), default="carry")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (CPU)")
    parser.add_argument("--check", action="store_true", help="compare with a single-process step on rank 0")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        backend = "nccl" if args.device == "cuda" else "gloo"
        dist.init_process_group(backend)
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank = dist.get_rank() if distributed else 0
    device = torch.device(args.device, torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=2).eval().to(device)  # eval: a local trunk
    smodel = fxstream.compile(
        model, tile_size=args.tile_size, schedule=args.schedule, tile_group=dist.group.WORLD if distributed else None
    )
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(1, 3, args.size, args.size, generator=gen).to(device)  # the same image on every rank
    target = torch.tensor([1], device=device)
    if rank == 0:
        shape = smodel.shape_plan(args.size, args.size)
        ranks = dist.get_world_size() if distributed else 1
        print(f"{ranks} process(es), {args.schedule}: {shape.num_tiles} tiles, bands {shape.schedule.bands}")
        print(describe_bands(shape.schedule.bands, shape.grid, args.schedule))

    times = []
    for step in range(args.steps + 1):
        model.zero_grad(set_to_none=True)
        if distributed:
            dist.barrier()
        start = time.perf_counter()
        loss = fxstream.serial_backward(smodel, F.cross_entropy, image, target)
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step > 0:
            times.append(time.perf_counter() - start)
    if rank == 0:
        print(f"loss {loss.item():.6f}; step time median {statistics.median(times):.2f} s over {len(times)} steps")
    if args.check and rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(image), target).backward()
        worst = max(
            (grads[n] - p.grad).abs().max().item() / p.grad.abs().max().item() for n, p in model.named_parameters()
        )
        print(f"largest relative gradient difference from plain autograd: {worst:.2e}")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
