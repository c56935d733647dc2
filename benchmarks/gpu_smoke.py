"""Preliminary side-by-side measurement of one training step: plain autograd vs fxstream.

ResNet-34 trunk (conv1..layer4, BatchNorm in eval mode) + average pool + linear head, batch 1,
forward + backward. Each configuration runs in its own process so peak memory is its own.
Reports median time per step (after a warm-up), peak memory (CUDA max allocated, or peak RSS
increase on CPU), and the max relative gradient error against plain autograd (TF32 off).

    python benchmarks/gpu_smoke.py                 # CUDA: 4096 and 8192 px, tile 2880
    python benchmarks/gpu_smoke.py --device cpu --sizes 512 --tile 640   # CPU smoke

This is the quick check run before the performance work of the benchmark issue; the
full sweep (checkpointing, lightstream, plots) lives in that issue.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn
import torchvision

import fxstream


def build_model(device: str) -> nn.Module:
    torch.manual_seed(0)
    m = torchvision.models.resnet34()
    model = nn.Sequential(
        m.conv1,
        m.bn1,
        m.relu,
        m.maxpool,
        m.layer1,
        m.layer2,
        m.layer3,
        m.layer4,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(512, 10),
    )
    return model.eval().to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step(model, x, target):
    model.zero_grad(set_to_none=True)
    loss = nn.functional.cross_entropy(model(x), target)
    loss.backward()
    return loss


def measure(method: str, size: int, tile: int, device: str, reps: int, autotune: bool = False) -> dict:
    """One method, in this process: time and peak memory. cudnn autotuning is off by default:
    with it, every new tile shape triggers a search that costs more than the step."""
    torch.backends.cudnn.benchmark = autotune
    model = build_model(device)
    net = fxstream.compile(model, tile_size=tile) if method == "fxstream" else model
    x = torch.randn(1, 3, size, size, device=device, generator=None)
    target = torch.tensor([1], device=device)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step(net, x, target)  # warm-up
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step(net, x, target)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) * 1024
    )
    result = {"method": method, "size": size, "time_s": statistics.median(times), "peak_gib": peak / 2**30}
    if method == "fxstream":
        result["tiles"] = len(net.shape_plan(size, size).tiles)
        result["halo_overhead"] = net.shape_plan(size, size).halo_overhead
    return result


def gradient_error(size: int, tile: int, device: str) -> float:
    """Max relative error over all parameter gradients, fp32 with TF32 off."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    model = build_model(device)
    x = torch.randn(1, 3, size, size, device=device)
    target = torch.tensor([1], device=device)
    step(model, x, target)
    ref = [p.grad.clone() for p in model.parameters()]
    step(fxstream.compile(model, tile_size=tile), x, target)
    return max(((p.grad - r).abs().max() / r.abs().max()).item() for p, r in zip(model.parameters(), ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--tile", type=int, default=2880)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--error-size", type=int, default=4096)
    parser.add_argument("--methods", nargs="+", default=["plain", "fxstream"])
    parser.add_argument("--no-error", action="store_true", help="skip the gradient-error check")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], int(args.child[1]), args.tile, args.device, args.reps)))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}, tile {args.tile}, fp32 (default TF32 settings)")
    rows = []
    for size in args.sizes:
        for method in args.methods:
            cmd = [
                sys.executable,
                __file__,
                "--device",
                args.device,
                "--tile",
                str(args.tile),
                "--reps",
                str(args.reps),
                "--child",
                method,
                str(size),
            ]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{method} {size}: failed\n{done.stderr[-2000:]}")
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            extra = f", {row['tiles']} tiles, h={row['halo_overhead']:.2f}" if "tiles" in row else ""
            print(
                f"{method:9s} {size:6d} px: {row['time_s']:.3f} s/step, peak {row['peak_gib']:.2f} GiB{extra}",
                flush=True,
            )
    if args.no_error:
        return
    err = gradient_error(args.error_size, args.tile, args.device)
    print(f"max relative parameter-gradient error at {args.error_size} px, TF32 off: {err:.2e}")


if __name__ == "__main__":
    main()
