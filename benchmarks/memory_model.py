"""Validate fxstream's predictive memory model (``fxstream.memory``) against measurements.

For each model, one float32 step runs in a fresh subprocess, and its measured peak
is compared with the prediction of ``fxstream.report.memory_model`` for the same input
shape and tile size:

* streamed training (forward + backward of a classification loss), streamed inference
  (forward under no_grad), and plain-autograd training at a smaller image;
* measured: on CUDA, ``torch.cuda.max_memory_allocated()`` during the step minus
  ``memory_allocated()`` before it; on CPU, the peak resident set size of the process
  during the step minus its resident size before it (``/proc/self/clear_refs`` resets
  the high-water mark ``VmHWM`` to the current RSS), with ``MALLOC_MMAP_THRESHOLD_``
  fixed at 256 KiB so that freed tensors leave the RSS (as in examples/demo.py);
* predicted: the model's peak minus what exists before the step (parameters, buffers,
  the input), since the measurement's baseline includes those. Before the baseline, one
  step of the same kind on a 96x96 image loads the kernels' code and thread pools (a
  first backward pass on CPU otherwise adds ~100 MiB of code pages to the RSS).

Models: torchvision resnet18, resnet34, resnet50 (eval-mode BatchNorm, random weights)
and a custom DAG (concatenated branches, dilation, max and average pooling).

Usage: python benchmarks/memory_model.py [--models resnet18 ...] [--size 1280] [--plain-size 768]
The error is (predicted - measured) / measured. Target: within +-25%.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxstream
from fxstream.cli.report import memory_model

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}
WARMUP = os.environ.get("FXSTREAM_MEMORY_WARMUP", "small")  # 'small' (96x96) or 'same' (the measured shape)
TILES = {"resnet18": 768, "resnet34": 1152, "resnet50": 768, "custom_dag": 512}


class CustomDAG(nn.Module):
    """A small encoder with branches merged by concatenation and addition, a dilated
    conv, max and average pooling, then a global head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU())
        self.a = nn.Conv2d(32, 32, 3, padding=1)
        self.b = nn.Sequential(nn.Conv2d(32, 32, 3, padding=2, dilation=2), nn.GELU())
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)
        self.c = nn.Conv2d(64, 96, 3, padding=1)
        self.skip = nn.Conv2d(64, 96, 1)
        self.avg = nn.AvgPool2d(2)
        self.d = nn.Conv2d(96, 128, 3, stride=2, padding=1)
        self.fc = nn.Linear(128, classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([F.relu(self.a(x)), self.b(x)], dim=1)
        x = self.pool(x)
        x = F.silu(self.c(x) + self.skip(x))
        x = F.relu(self.d(self.avg(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = CustomDAG() if name == "custom_dag" else getattr(torchvision.models, name)(weights=None)
    return model.eval()


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- the measured step (in a subprocess) ---------------------------------------------------


def measure(name: str, mode: str, size: int, tile: int) -> int:
    """Bytes above the baseline during one step (see the module docstring)."""
    model = build(name).to(device())
    net = model if mode == "plain" else fxstream.compile(model, tile_size=tile)
    x = torch.randn(1, 3, size, size, device=device())
    target = torch.tensor([3], device=device())
    # Warm up with one step of the same kind: the RSS counts the code pages of every
    # kernel (forward and backward) the first time it runs, thread pools, and oneDNN's
    # per-shape primitives; a step on the same shape (--warmup same) loads all of them.
    edge = size if WARMUP == "same" else 96
    warm = torch.zeros(1, 3, edge, edge, device=device())
    if mode == "inference":
        with torch.no_grad():
            net(warm)
    else:
        F.cross_entropy(net(warm), target).backward()
        model.zero_grad(set_to_none=True)
    baseline = _reset_peak()
    if mode == "inference":
        with torch.no_grad():
            net(x)
    else:
        F.cross_entropy(net(x), target).backward()
    return _peak() - baseline


def _reset_peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset VmHWM to the current RSS
    return _status("VmRSS")


def _peak() -> int:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _status("VmHWM")


def _status(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(key + ":"))


def run_child(name: str, mode: str, size: int, tile: int) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, mode, str(size), str(tile)]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV}, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"measurement {name} {mode} failed")
    return int(json.loads(proc.stdout.strip().splitlines()[-1])["bytes"])


# --- the prediction ------------------------------------------------------------------------


def predict(name: str, mode: str, size: int, tile: int) -> int:
    """Predicted bytes above the baseline (parameters, buffers and input excluded)."""
    smodel = fxstream.compile(build(name), tile_size=tile)
    model, _ = memory_model(smodel, (1, 3, size, size), torch.float32)
    estimate = model.estimate((size, size))
    peak = {
        "training": estimate.streamed_training,
        "inference": estimate.streamed_inference,
        "plain": estimate.plain_training,
    }[mode]
    return peak.total - peak.parts["parameters"] - peak.parts["input"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(TILES))
    parser.add_argument("--size", type=int, default=1280, help="image edge of the streamed steps")
    parser.add_argument("--plain-size", type=int, default=768, help="image edge of the plain-autograd step")
    parser.add_argument("--modes", nargs="+", default=["training", "inference", "plain"])
    parser.add_argument(
        "--warmup",
        choices=["small", "same"],
        default="small",
        help="warm-up step: 96x96 or the "
        "measured shape (oneDNN's per-shape primitives then stay out of the measurement)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["FXSTREAM_MEMORY_WARMUP"] = args.warmup
    if args.child:
        name, mode, size, tile = args.child
        print(json.dumps({"bytes": measure(name, mode, int(size), int(tile))}))
        return 0
    measure_kind = "cuda max_memory_allocated" if torch.cuda.is_available() else "peak RSS increase (VmHWM - VmRSS)"
    print(f"fxstream memory model validation: torch {torch.__version__}, {device()}, {platform.processor() or ''}")
    print(
        f"measured: {measure_kind}, warm-up step: {args.warmup}; "
        "predicted: fxstream.memory, minus parameters and input\n"
    )
    header = f"{'model':<11} {'step':<20} {'image':>6} {'tile':>5} {'predicted':>10} {'measured':>10} {'error':>7}"
    print(header)
    print("-" * len(header), flush=True)
    worst = 0.0
    for name in args.models:
        tile = TILES[name]
        for mode, size in (("training", args.size), ("inference", args.size), ("plain", args.plain_size)):
            if mode not in args.modes:
                continue
            predicted = predict(name, mode, size, tile)
            measured = run_child(name, mode, size, tile)
            error = (predicted - measured) / measured
            worst = max(worst, abs(error))
            label = {"training": "streamed training", "inference": "streamed inference", "plain": "plain training"}
            print(
                f"{name:<11} {label[mode]:<20} {size:>6} {tile if mode != 'plain' else '-':>5} "
                f"{predicted / 2**20:>7.0f} MiB {measured / 2**20:>6.0f} MiB {100 * error:>+6.1f}%",
                flush=True,
            )
    print(f"\nworst |error|: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
