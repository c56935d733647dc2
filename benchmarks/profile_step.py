"""Where the time of one fxstream training step goes (CPU or CUDA), by torch.profiler.

    python benchmarks/profile_step.py                       # ResNet-18, 2048 px, tile 1024, CPU
    python benchmarks/profile_step.py --boundary layer2     # the high-resolution prefix
    python benchmarks/profile_step.py --trace step.json     # also a Chrome trace

Prints the step's wall time, the tile count and h, the top ops by self time, and a
breakdown by phase: the no-grad forward over the tiles, the backward recomputation of the
tiles (forward with autograd), the tiles' back-propagation, and the window ops (crops,
border padding, clones) inside both, plus what is left for Python and the head.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))

import methods  # noqa: E402
import models  # noqa: E402

WINDOW_OPS = (
    "aten::narrow",
    "aten::slice",
    "aten::constant_pad_nd",
    "aten::pad",
    "aten::clone",
    "aten::copy_",
    "aten::index_select",
    "aten::empty",
    "aten::zeros",
    "aten::zero_",
    "aten::fill_",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18", choices=list(models.ARCHS))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--boundary", default="layer4", help="last streamed trunk child (layer4: whole trunk)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace", help="write a Chrome trace here")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--method", default="fxstream", choices=list(methods.METHODS), help="profile another method")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    net = models.build(args.arch, args.device)
    s = methods.Setting(upto=args.boundary, tile=args.tile, size=(args.size, args.size), device=args.device)
    fx = methods.METHODS[args.method](net, s)
    x = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(args.device)
    target = torch.tensor([7], device=args.device)
    fx.step(x, target)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    start = time.perf_counter()
    with profile(activities=activities, record_shapes=False) as prof:
        with record_function("step"):
            fx.step(x, target)
        if args.device == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    info = fx.info
    plan = f"{info['tiles']} tiles, h={info['h']:.3f}, floor (1+3h)/3={info['floor_ratio']:.3f}x plain" if info else ""
    print(f"{args.method}: {args.arch} to {args.boundary}, {args.size} px, tile {args.tile}: {plan}; step {wall:.2f} s")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    print_phases(prof)
    if args.trace:
        prof.export_chrome_trace(args.trace)
        print(f"wrote {args.trace}")


def print_phases(prof) -> None:
    """Self CPU time grouped: convolutions (forward/backward), BatchNorm, pointwise,
    window/copy ops, parameter-gradient accumulation, other."""
    groups: dict[str, float] = defaultdict(float)
    total = 0.0
    for evt in prof.key_averages():
        t = evt.self_cpu_time_total
        total += t
        name = evt.key
        if "convolution_backward" in name or "ConvolutionBackward" in name:
            groups["conv backward"] += t
        elif "conv" in name or "mkldnn_convolution" in name:
            groups["conv forward"] += t
        elif "batch_norm" in name or "BatchNorm" in name:
            groups["batch norm (fwd+bwd)"] += t
        elif "max_pool" in name or "MaxPool" in name:
            groups["max pool (fwd+bwd)"] += t
        elif name in ("aten::add_", "aten::add"):
            groups["add / add_ (residuals, grad accumulation)"] += t
        elif name in WINDOW_OPS:
            groups["window/copy/alloc ops"] += t
        elif "relu" in name.lower() or "threshold" in name:
            groups["relu (fwd+bwd)"] += t
        else:
            groups["other"] += t
    print("self CPU time by group (all threads' op time, not wall time):")
    for name, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<45s} {t / 1e6:8.2f} s  {100 * t / total:5.1f}%")


if __name__ == "__main__":
    main()
