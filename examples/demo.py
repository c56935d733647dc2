"""fxstream demo: train ResNet-18 on a large image tile by tile, exactly.

What it shows, on synthetic data (no downloads, CPU is enough):

1. The plan: ``fxstream.compile`` finds the trunk of a torchvision ResNet-18 (everything
   before the global average pool), its receptive field and stride, and the block of
   trunk-output pixels that one input tile of ``--tile-size`` pixels yields. For a given
   image it cuts the trunk output into a grid of such blocks; ``h`` (halo overhead) is the
   work of all tiles divided by one whole-image pass.
2. Exactness: in float64, the streamed model's output, its input gradient and every
   parameter gradient match plain autograd to rounding error (~1e-15).
3. Memory: the peak memory of one float32 training step (forward + backward), measured
   for plain autograd and for fxstream, each in a fresh subprocess. Plain autograd keeps
   every activation of the whole image; fxstream keeps those of one tile.

The model is in eval mode (streaming needs a local trunk, so BatchNorm uses its running
statistics, which are randomised a little so that every gradient is non-trivial).

Usage: python examples/demo.py [--size HxW] [--check-size HxW] [--tile-size T] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxstream

TOLERANCE = 1e-10  # float64: streamed and whole-image differ only in summation order
# The exactness image is taller than the tile, so that it is cut into several tiles (an
# image axis that fits in one tile is not cut).
DEFAULTS = {"size": "2048x1536", "check_size": "1000x709", "tile_size": 768}
QUICK = {"size": "300x233", "check_size": "500x233", "tile_size": 480}
# The CPU memory measure is the process's peak resident set size. glibc normally keeps
# freed blocks below an adaptive threshold (up to 32 MiB) in its heap, so the RSS of a
# process that allocates many tile-sized tensors counts memory torch has already freed.
# A fixed threshold makes every block of 256 KiB or more its own mapping, returned to the
# OS when torch frees it: RSS then follows the memory torch holds. Each fresh mapping costs
# page faults, though, so the time per step is taken from a run with the default settings.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}


# --- Setup -------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--size", metavar="HxW", help=f"image of the memory/time measurement (default {DEFAULTS['size']})"
    )
    parser.add_argument(
        "--check-size", metavar="HxW", help=f"image of the float64 exactness check (default {DEFAULTS['check_size']})"
    )
    parser.add_argument(
        "--tile-size", type=int, metavar="T", help=f"input tile edge in pixels (default {DEFAULTS['tile_size']})"
    )
    parser.add_argument("--quick", action="store_true", help="small images, for a fast smoke test")
    parser.add_argument("--measure", choices=["plain", "streamed"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.size, args.check_size = parse_size(args.size), parse_size(args.check_size)
    return args


def parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"image size must look like HxW (e.g. 1000x777), got {text!r}") from None
    return height, width


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def build_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """ResNet-18 (random weights, eval mode) with BatchNorm statistics and affine
    parameters randomised a little; the same model for the same dtype, every call."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
    return model.to(device=device(), dtype=dtype)


def synthetic_batch(size: tuple[int, int], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One random image of ``size`` and a class label."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, *size, generator=gen, dtype=dtype)
    return x.to(device()), torch.tensor([7], device=device())


def training_step(net: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Forward + backward of a classification loss; returns the (detached) output."""
    out = net(x)
    F.cross_entropy(out, target).backward()
    return out.detach()


# --- 1. The plan ---------------------------------------------------------------------------


def print_plan(smodel: fxstream.StreamedModule, sizes: list[tuple[int, int]]) -> None:
    plan = smodel.plan
    print("== 1. Plan ==")
    print(f"trunk: up to '{plan.boundary}' (the rest runs normally on the assembled feature map)")
    print(f"receptive field: {fmt(plan.receptive_field)} px, stride: {fmt(plan.stride)} px")
    print(f"tile size {fmt(plan.tile_size)} px  ->  output block per tile: {fmt(plan.block)} px of the trunk output")
    for size in dict.fromkeys(sizes):  # each distinct size once
        shape = smodel.shape_plan(*size)
        h = shape.halo_overhead
        print(
            f"image {fmt(size)}: trunk output {fmt(shape.output_size)}, tile grid {fmt(shape.grid)} = "
            f"{len(shape.tiles)} tiles, halo overhead h = {h:.2f}, FLOP ratio (1+3h)/3 = {(1 + 3 * h) / 3:.2f}x"
        )
    print()


def fmt(values) -> str:
    return "x".join(str(v) for v in values)


# --- 2. Exactness --------------------------------------------------------------------------


def check_exactness(args: argparse.Namespace) -> float:
    """Streamed vs plain in float64: output, input gradient, every parameter gradient."""
    print(f"== 2. Exactness (float64, image {fmt(args.check_size)}) ==")
    model = build_model(torch.float64)
    smodel = fxstream.compile(model, tile_size=args.tile_size)
    x, target = synthetic_batch(args.check_size, torch.float64)
    start = time.perf_counter()
    reference = gradients(model, model, x, target)
    streamed = gradients(smodel, model, x, target)
    errors = {name: rel_err(streamed[name], ref) for name, ref in reference.items()}
    worst = max(errors, key=errors.get)
    print(f"compared {len(errors)} tensors: the output, the input gradient and {len(errors) - 2} parameter gradients")
    print(f"  output {errors['output']:.1e}, input grad {errors['input grad']:.1e}, worst: {worst}")
    print(f"max relative error: {errors[worst]:.2e} (tolerance {TOLERANCE:.0e}; {time.perf_counter() - start:.1f} s)")
    print()
    return errors[worst]


def gradients(net: nn.Module, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> dict:
    """Run one training step of ``net`` (``model`` or its streamed version, which share
    parameters) and collect the output and every ``.grad``."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    result = {"output": training_step(net, x, target), "input grad": x.grad}
    result.update({f"grad {name}": p.grad for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max|b|."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# --- 3. Memory and time (each in a fresh subprocess) -----------------------------------------


def measure_child(args: argparse.Namespace) -> None:
    """In the subprocess: one float32 training step; prints its peak memory as JSON."""
    model = build_model(torch.float32)
    net = model if args.measure == "plain" else fxstream.compile(model, tile_size=args.tile_size)
    x, target = synthetic_batch(args.size, torch.float32)
    with torch.no_grad():  # warm up kernels and thread pools on a tiny image (no grads kept)
        net(torch.zeros(1, 3, 64, 64, device=x.device))
    baseline = memory_now()
    start = time.perf_counter()
    training_step(net, x, target)
    sync()
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mib": (peak_memory() - baseline) / 2**20, "seconds": seconds}))


def memory_now() -> int:
    """Bytes, the baseline: allocated by torch on CUDA; the peak RSS so far on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return peak_memory()


def peak_memory() -> int:
    """Bytes: torch.cuda.max_memory_allocated on CUDA; on CPU the peak RSS of this
    process, VmHWM on Linux (ru_maxrss there starts at the parent's peak after exec)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB elsewhere


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_child(mode: str, args: argparse.Namespace, env: dict) -> dict:
    """Run this script with ``--measure mode`` in a fresh process and parse its result."""
    script = os.path.abspath(__file__)
    command = [sys.executable, script, "--measure", mode, "--size", fmt(args.size), "--tile-size", str(args.tile_size)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the '{mode}' measurement failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> dict:
    """Peak memory and time of one step, plain and streamed, each in fresh subprocesses."""
    print(f"== 3. Memory and time of one training step (float32, image {fmt(args.size)}) ==")
    cuda = torch.cuda.is_available()
    retime = not cuda and not args.quick  # the fixed mmap threshold costs page faults: time a default run
    if cuda:
        print("memory: torch.cuda.max_memory_allocated() during the step, minus the memory allocated before it")
    else:
        malloc = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        print("memory: peak RSS increase over a baseline taken after building the model and the input")
        print("        (torch has no allocator counter on CPU; VmHWM of /proc/self/status, else ru_maxrss),")
        print(f"        with {malloc} so that the tensors torch frees leave the RSS")
    if retime:
        print("time:   a second run with the default malloc settings (the fixed threshold costs page faults)")
    results = {}
    for mode in ("plain", "streamed"):
        result = run_child(mode, args, MALLOC_ENV)
        if retime:
            result["seconds"] = run_child(mode, args, {})["seconds"]
        results[mode] = result
        print(f"  {mode:<9} peak +{result['peak_mib']:5.0f} MiB   {result['seconds']:5.1f} s/step")
    print()
    return results


# --- Summary -------------------------------------------------------------------------------


def print_summary(args: argparse.Namespace, smodel, error: float, results: dict) -> None:
    plain, streamed = results["plain"], results["streamed"]
    h = smodel.shape_plan(*args.size).halo_overhead
    rows = [
        ("peak memory (MiB)", f"{plain['peak_mib']:.0f}", f"{streamed['peak_mib']:.0f}"),
        ("time per step (s)", f"{plain['seconds']:.1f}", f"{streamed['seconds']:.1f}"),
        ("max rel. error, float64", "(reference)", f"{error:.1e}"),
    ]
    print("== Summary ==")
    print(f"ResNet-18, one training step on {fmt(args.size)}, tile size {args.tile_size}:")
    print(f"  {'':<24} {'plain autograd':>14} {'fxstream':>14}")
    for name, a, b in rows:
        print(f"  {name:<24} {a:>14} {b:>14}")
    print(
        f"  peak memory plain / fxstream = {plain['peak_mib'] / streamed['peak_mib']:.1f}x; time fxstream / plain = "
        f"{streamed['seconds'] / plain['seconds']:.1f}x (FLOP ratio estimate (1+3h)/3 = {(1 + 3 * h) / 3:.2f}x)"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # show progress when piped too
    if args.measure:
        measure_child(args)
        return 0
    print(
        f"fxstream {fxstream.__version__}, torch {torch.__version__}, device {device()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    try:
        smodel = fxstream.compile(build_model(), tile_size=args.tile_size)
    except fxstream.FxStreamError as exc:
        print(f"fxstream.compile failed: {exc}", file=sys.stderr)
        return 2
    print_plan(smodel, [args.check_size, args.size])
    error = check_exactness(args)
    if not error < TOLERANCE:
        print(f"FAILED: max relative error {error:.2e} is not below {TOLERANCE:.0e}", file=sys.stderr)
        return 1
    results = measure_memory(args)
    print_summary(args, smodel, error, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
