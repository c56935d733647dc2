"""fxstream demo: one training step of ResNet-18, plain and streamed: same gradients, less memory.

What it shows, on synthetic data (no downloads, a CPU is enough), in one to two minutes on 2 CPU cores:

1. The plan: ``fxstream.compile`` finds the trunk of a torchvision ResNet-18 (everything
   before the global average pool), its receptive field and stride, and how an image is cut
   into tiles. With the default carry schedule a tile may be smaller than the receptive
   field (435 px here): each tile reads thin stripes that earlier tiles left.
2. Exactness: in float64, the streamed model's output, its input gradient and every
   parameter gradient match plain autograd to rounding error (~1e-15), on several tiles.
3. Memory: the peak memory of one float32 training step (forward + backward), plain
   autograd against fxstream, each measured in a fresh subprocess. Plain autograd keeps
   every activation of the whole image; fxstream keeps those of one tile (plus stripes and
   a second buffer of the trunk's parameter gradients), so the gap grows with the image
   (``--size 2048x1536``: about 3x).
4. Time: plain and streamed steps timed in this process, alternating, so that both see the
   same machine load. The carry schedule computes every activation once in the forward
   pass and once more in the backward recomputation: about 4/3 of a plain step's
   arithmetic, plus the stripe copies and the overhead of many smaller convolutions, which
   the measured ratio includes. ``--compare-recompute`` also times the recompute schedule
   (independent tiles, each recomputing its halo; predicted (1 + 3h) / 3), at a tile larger
   than the receptive field, which it needs.
5. Gigapixel sides, predicted: the memory model (``fxstream plan``'s) predicts the peak of
   a plain step and of a streamed one (carry, carry with banded stripes, recompute) on a CPU
   at 8192, 32768 and 100,000 px sides, with nothing allocated, and the demo saves a plot of
   predicted memory against image side (``--out DIR``, default a new temporary folder; the
   path is printed).

The model is in eval mode (streaming needs a local trunk, so BatchNorm uses its running
statistics, which are randomised a little so that every gradient is non-trivial).

CPU steps run on one thread per process by default (``--threads``; see THREADS_NOTE).

Usage: python examples/demo.py [--size HxW] [--check-size HxW] [--tile-size T] [--reps R]
       [--threads N] [--compare-recompute] [--recompute-tile-size T] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxstream

TOLERANCE = 1e-10  # float64: streamed and whole-image differ only in summation order
# The exactness image is cut into 2x1 tiles; the measured image into 5x4 (carry) and 3x2
# (recompute, which needs tiles larger than the receptive field).
DEFAULTS = {
    "size": "1280x960",
    "check_size": "300x233",
    "tile_size": 320,
    "check_tile_size": 256,
    "recompute_tile_size": 768,
    "reps": 2,
}
QUICK = {
    "size": "300x233",
    "check_size": "300x233",
    "tile_size": 224,
    "check_tile_size": 224,
    "recompute_tile_size": 480,
    "reps": 1,
}
# Section 5: the predicted peaks at these image sides (px), with this tile for every schedule,
# and the sides of the plot (4k to 100k, log-spaced; at smaller sides the tile is most of the image).
GIGAPIXEL_SIDES = (8192, 32768, 100_000)
GIGAPIXEL_TILE = 2048
GIGAPIXEL_SCHEDULES = {  # key: (schedule, column label)
    "carry": ("carry", "carry"),
    "banded": (fxstream.Schedule("carry", stripes="banded"), "banded"),
    "recompute": ("recompute", "recompute"),
}
PLOT_SIDES = (4096, 8192, 16384, 32768, 65536, 100_000)
# The CPU memory measure is the process's peak resident set size. glibc normally keeps
# freed blocks below an adaptive threshold (up to 32 MiB) in its heap, so the RSS of a
# process that allocates many tile-sized tensors counts memory torch has already freed.
# A fixed threshold makes every block of 256 KiB or more its own mapping, returned to the
# OS when torch frees it: RSS then follows the memory torch holds. Each fresh mapping costs
# page faults, so the times are measured in this process, with the default settings.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}
# THREADS_NOTE: on a CPU shared with other jobs, a multi-threaded (OpenMP) step waits at
# every op's barrier for threads that the kernel has descheduled. A streamed step runs many
# more, smaller ops than a plain one, so it pays this far more often: on a 2-core machine
# with a load average of 5, two threads made the streamed step 12x a plain one, one thread
# 1.3x. One thread per process (the default here) measures the schedules, not the contention.


# --- Setup -------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", metavar="HxW", help=f"image of the memory and time measurement ({DEFAULTS['size']})")
    parser.add_argument("--check-size", metavar="HxW", help=f"image of the float64 check ({DEFAULTS['check_size']})")
    parser.add_argument("--tile-size", type=int, metavar="T", help=f"carry tile edge, px ({DEFAULTS['tile_size']})")
    parser.add_argument("--check-tile-size", type=int, metavar="T", help="carry tile edge of the float64 check (256)")
    parser.add_argument(
        "--recompute-tile-size", type=int, metavar="T", help=f"recompute tile edge ({DEFAULTS['recompute_tile_size']})"
    )
    parser.add_argument("--reps", type=int, metavar="R", help="timed steps per method; the fastest counts (2)")
    parser.add_argument(
        "--threads", type=int, default=1, metavar="N", help="CPU threads per process (default 1; see THREADS_NOTE)"
    )
    parser.add_argument("--compare-recompute", action="store_true", help="also time the recompute schedule")
    parser.add_argument("--out", metavar="DIR", help="folder for the plot (default: a new temporary folder)")
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


def fmt(values) -> str:
    return "x".join(str(v) for v in values)


# --- 1. The plan ---------------------------------------------------------------------------


def print_plan(args: argparse.Namespace, carry: fxstream.StreamedModule, recompute) -> None:
    plan = carry.plan
    print("== 1. Plan ==")
    print(f"trunk: up to '{plan.boundary}' (the rest runs normally on the assembled feature map)")
    print(f"receptive field: {fmt(plan.receptive_field)} px, stride: {fmt(plan.stride)} px")
    for name, smodel, tile in (("carry", carry, args.tile_size), ("recompute", recompute, args.recompute_tile_size)):
        shape = smodel.shape_plan(*args.size)
        h = shape.halo_overhead
        print(
            f"{name:<9} tile {tile} px, image {fmt(args.size)}: {fmt(shape.grid)} = {shape.num_tiles} tiles, "
            f"h = {h:.2f}, step arithmetic {smodel.schedule.step_ratio(h):.2f}x plain"
        )
    print("(h: pixels computed over all tiles / one whole-image pass; carry computes each once)")
    print()


# --- 2. Exactness --------------------------------------------------------------------------


def check_exactness(args: argparse.Namespace) -> float:
    """Streamed vs plain in float64: output, input gradient, every parameter gradient."""
    print(f"== 2. Exactness (float64, image {fmt(args.check_size)}, carry tile {args.check_tile_size}) ==")
    model = build_model(torch.float64)
    smodel = fxstream.compile(model, tile_size=args.check_tile_size)
    x, target = synthetic_batch(args.check_size, torch.float64)
    start = time.perf_counter()
    reference = gradients(model, model, x, target)
    streamed = gradients(smodel, model, x, target)
    errors = {name: rel_err(streamed[name], ref) for name, ref in reference.items()}
    worst = max(errors, key=errors.get)
    tiles = smodel.shape_plan(*args.check_size).num_tiles
    print(f"compared {len(errors)} tensors: the output, the input gradient and {len(errors) - 2} parameter gradients")
    print(f"  in {tiles} tiles; output {errors['output']:.1e}, input grad {errors['input grad']:.1e}, worst: {worst}")
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


# --- 3. Memory (each in a fresh subprocess) -------------------------------------------------


def measure_child(args: argparse.Namespace) -> None:
    """In the subprocess: one float32 training step; prints its peak memory as JSON."""
    model = build_model(torch.float32)
    net = model if args.measure == "plain" else fxstream.compile(model, tile_size=args.tile_size)
    x, target = synthetic_batch(args.size, torch.float32)
    with torch.no_grad():  # warm up kernels and thread pools on a tiny image (no grads kept)
        net(torch.zeros(1, 3, 64, 64, device=x.device))
    baseline = memory_now()
    training_step(net, x, target)
    print(json.dumps({"peak_mib": (peak_memory() - baseline) / 2**20}))


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


def run_child(mode: str, args: argparse.Namespace) -> dict:
    """Run this script with ``--measure mode`` in a fresh process and parse its result."""
    script = os.path.abspath(__file__)
    command = [sys.executable, script, "--measure", mode, "--size", fmt(args.size), "--tile-size", str(args.tile_size)]
    command += ["--threads", str(args.threads)]
    proc = subprocess.run(command, check=False, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the '{mode}' measurement failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_memory(args: argparse.Namespace) -> dict:
    """Peak memory of one step, plain and streamed (carry), each in a fresh subprocess."""
    print(f"== 3. Peak memory of one training step (float32, image {fmt(args.size)}, carry tile {args.tile_size}) ==")
    if torch.cuda.is_available():
        print("torch.cuda.max_memory_allocated() during the step, minus the memory allocated before it")
    else:
        malloc = " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        print("peak RSS increase over a baseline taken after building the model and the input")
        print(f"(VmHWM of /proc/self/status), each in a fresh process with {malloc}")
    results = {}
    for mode in ("plain", "streamed"):
        results[mode] = run_child(mode, args)["peak_mib"]
        print(f"  {mode:<9} peak +{results[mode]:5.0f} MiB")
    print()
    return results


# --- 4. Time (in this process, alternating) -----------------------------------------------


def measure_time(args: argparse.Namespace) -> dict:
    """Seconds per float32 training step: the fastest of ``reps`` steps per method, the
    methods alternating in each round so that a change of machine load hits them all."""
    print(f"== 4. Time of one training step (float32, image {fmt(args.size)}, this process) ==")
    model = build_model(torch.float32)
    nets = {
        "plain": model,
        "carry": fxstream.compile(model, tile_size=args.tile_size),
    }
    if args.compare_recompute:
        nets["recompute"] = fxstream.compile(model, tile_size=args.recompute_tile_size, schedule="recompute")
    x, target = synthetic_batch(args.size, torch.float32)
    with torch.no_grad():  # warm up kernels and thread pools
        for net in nets.values():
            net(torch.zeros(1, 3, 64, 64, device=x.device))
    times = {name: float("inf") for name in nets}
    for _ in range(args.reps):
        for name, net in nets.items():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            training_step(net, x, target)
            sync()
            times[name] = min(times[name], time.perf_counter() - start)
    for name, seconds in times.items():
        print(f"  {name:<9} {seconds:6.2f} s/step   ({seconds / times['plain']:.2f}x plain)")
    print(f"(the fastest of {args.reps} steps each; {os.cpu_count()} CPUs, load average {load_average()})")
    print()
    return {"times": times, "nets": nets}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_average() -> str:
    try:
        return " ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


# --- 5. Gigapixel sides, predicted (nothing allocated) ------------------------------------


def predict_gigapixel(args: argparse.Namespace) -> dict:
    """Predicted peak bytes of one float32 training step on a CPU (one memory), plain and
    streamed under each of GIGAPIXEL_SCHEDULES (tile GIGAPIXEL_TILE), per image side, and
    the parts the caveat names; from the memory model that ``fxstream plan`` prints
    (``fxstream.cli.report.memory_model``): shapes only, no image allocated.

    The image itself is left out of every figure: a plain step needs it in memory as a
    float32 tensor, while fxstream reads it tile by tile from a file or memmap."""
    from fxstream.cli.report import memory_model

    model = build_model(torch.float32)
    sides = sorted(set(GIGAPIXEL_SIDES) | set(PLOT_SIDES))
    predicted: dict = {"side": sides}
    for key, (schedule, _) in GIGAPIXEL_SCHEDULES.items():
        smodel = fxstream.compile(model, tile_size=GIGAPIXEL_TILE, schedule=schedule)
        memory, _ = memory_model(smodel, (1, 3, GIGAPIXEL_TILE, GIGAPIXEL_TILE), torch.float32, "cpu")
        estimates = [memory.estimate((side, side)) for side in sides]
        predicted[key] = [_without_image(e.streamed_training) for e in estimates]
        parts = [e.streamed_training.parts for e in estimates]
        predicted[f"{key} stripes"] = [sum(v for k, v in p.items() if k.startswith("stripe")) for p in parts]
        if key == "carry":  # the same in every schedule
            predicted["plain"] = [_without_image(e.plain_training) for e in estimates]
            predicted["image"] = [e.plain_training.parts["input"] for e in estimates]
            predicted["trunk output"] = [p.get("trunk output", 0) for p in parts]
    return predicted


def _without_image(peak) -> int:
    return peak.total - peak.parts.get("input", 0)


def print_gigapixel(predicted: dict) -> None:
    gib = 2**30
    print("== 5. Predicted peak memory at gigapixel sides (memory model; nothing allocated) ==")
    print(
        f"ResNet-18, one float32 training step on a CPU, tile {GIGAPIXEL_TILE} px, "
        "not counting the image itself (GiB);\n"
        "banded: carry with stripes='banded'; plain / best: plain over the smallest fxstream figure"
    )
    header = "".join(f" {label:>9}" for _, label in GIGAPIXEL_SCHEDULES.values())
    print(f"  {'image side':>10} {'plain':>9}{header} {'plain / best':>13}")
    for side in GIGAPIXEL_SIDES:
        i = predicted["side"].index(side)
        values = [predicted[key][i] / gib for key in GIGAPIXEL_SCHEDULES]
        cells = "".join(f" {v:>9.1f}" for v in values)
        plain = predicted["plain"][i] / gib
        print(f"  {side:>10,} {plain:>9.1f}{cells} {plain / min(values):>12.0f}x")
    i = predicted["side"].index(GIGAPIXEL_SIDES[-1])
    out, image = predicted["trunk output"][i] / gib, predicted["image"][i] / gib
    store, band = predicted["carry stripes"][i] / gib, predicted["banded stripes"][i] / gib
    caveat = (
        f"At {GIGAPIXEL_SIDES[-1]:,} px every schedule's figure includes the trunk output and its gradient, "
        f"{out:.1f} GiB each (ResNet-18's trunk ends at stride 32 with 512 channels): they grow with the "
        f"image area. So does carry's stripe store ({store:.1f} GiB: on a CPU every stripe stays in memory "
        f"for the backward pass); stripes='banded' keeps one band's ({band:.1f} GiB) for one more forward "
        "pass. On a GPU the default stripes='auto' keeps the store in host memory, and "
        "output_device='cpu' puts the trunk output and its gradient there too. The image, "
        f"{image:.0f} GiB in float32, is for a plain step to hold; fxstream reads it tile by tile from a "
        "file or memmap."
    )
    print(textwrap.fill(caveat, width=100))


def plot_gigapixel(predicted: dict, out_dir: str) -> str | None:
    """Save a log-log plot of the predicted peaks against the image side; its path, or None
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no plot; pip install matplotlib)")
        return None
    gib = 2**30
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "plain": ("plain autograd", "tab:red", "o"),
        "carry": (f"fxstream carry (tile {GIGAPIXEL_TILE})", "tab:blue", "s"),
        "banded": (f"fxstream carry, banded stripes (tile {GIGAPIXEL_TILE})", "tab:purple", "D"),
        "recompute": (f"fxstream recompute (tile {GIGAPIXEL_TILE})", "tab:green", "^"),
    }
    for key, (label, color, marker) in styles.items():
        ax.plot(predicted["side"], [v / gib for v in predicted[key]], marker=marker, color=color, label=label)
    ax.plot(predicted["side"], [v / gib for v in predicted["image"]], ":", color="gray", label="the image (float32)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image side (px), square image")
    ax.set_ylabel("predicted peak memory, without the image (GiB)", fontsize=9)
    ax.set_title("ResNet-18, one float32 training step on a CPU: predicted by fxstream's memory model", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "memory-vs-side.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- Summary -------------------------------------------------------------------------------


def print_summary(args: argparse.Namespace, error: float, memory: dict, timing: dict) -> None:
    times, nets = timing["times"], timing["nets"]
    h = nets["carry"].shape_plan(*args.size).halo_overhead
    print("== Summary ==")
    print(f"ResNet-18, one float32 training step on {fmt(args.size)}:")
    print(f"  {'':<26} {'plain autograd':>15} {'fxstream carry':>15}")
    print(f"  {'peak memory (MiB)':<26} {memory['plain']:>15.0f} {memory['streamed']:>15.0f}")
    print(f"  {'time per step (s)':<26} {times['plain']:>15.2f} {times['carry']:>15.2f}")
    print(f"  {'max rel. error, float64':<26} {'(reference)':>15} {error:>15.1e}")
    print(
        f"  peak memory plain / fxstream = {memory['plain'] / memory['streamed']:.1f}x with tile {args.tile_size}; "
        f"time fxstream / plain = {times['carry'] / times['plain']:.2f}x "
        f"(arithmetic alone: {nets['carry'].schedule.step_ratio(h):.2f}x)"
    )
    if "recompute" in nets:
        h = nets["recompute"].shape_plan(*args.size).halo_overhead
        print(
            f"  recompute schedule, tile {args.recompute_tile_size}: time {times['recompute'] / times['plain']:.2f}x "
            f"plain (arithmetic alone: (1+3h)/3 = {nets['recompute'].schedule.step_ratio(h):.2f}x, h = {h:.2f})"
        )


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # show progress when piped too
    if device().type == "cpu":
        torch.set_num_threads(args.threads)
    if args.measure:
        measure_child(args)
        return 0
    start = time.perf_counter()
    print(
        f"fxstream {fxstream.__version__}, torch {torch.__version__}, device {device()}, "
        f"{torch.get_num_threads()} threads\n"
    )
    try:
        model = build_model()
        carry = fxstream.compile(model, tile_size=args.tile_size)
        recompute = fxstream.compile(model, tile_size=args.recompute_tile_size, schedule="recompute")
    except fxstream.FxStreamError as exc:
        print(f"fxstream.compile failed: {exc}", file=sys.stderr)
        return 2
    print_plan(args, carry, recompute)
    error = check_exactness(args)
    if not error < TOLERANCE:
        print(f"FAILED: max relative error {error:.2e} is not below {TOLERANCE:.0e}", file=sys.stderr)
        return 1
    memory = measure_memory(args)
    timing = measure_time(args)
    print_summary(args, error, memory, timing)
    print()
    predicted = predict_gigapixel(args)
    print_gigapixel(predicted)
    out_dir = args.out or tempfile.mkdtemp(prefix="fxstream-demo-")
    path = plot_gigapixel(predicted, out_dir)
    if path:
        print(f"plot of predicted memory against image side: {path}")
    print(f"\n(demo took {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
