"""Where the carry schedule keeps its stripes: time and tensor peak of one training step per
placement, against the memory model.

    python benchmarks/stripes.py --device cpu --arch resnet18 --size 2048 --tile 512 --threads 1
    python benchmarks/stripes.py --device cuda --arch resnet34 --size 8192 --tile 2048
    python benchmarks/stripes.py --device cuda --arch resnet34 --size 32768 --tile 2048 \\
        --schedules host --output-device cpu --reps 1
    python benchmarks/stripes.py --dry-run            # tiny sizes on the CPU: the script's own check

``--interleave`` times the schedules in one process instead, a step of each in turn per
round, so that the load of a shared machine weighs on all of them alike (no memory figures).

Schedules (``--schedules``): ``plain`` (autograd on the whole image), ``recompute``, and the
carry schedule with its stripes ``device``, ``host`` or ``banded`` (``--band-rows`` rows per
band). Each runs in its own process. Per schedule: the median step time over ``--reps``
(after one warm-up step, which also plans the tiling) and its ratio to plain, the predicted
step ratio (``fxstream plan``'s, FLOP-weighted), the measured tensor peak of one more step
(:mod:`fxstream.memory.truth`: CPU allocation events, or CUDA ``max_memory_allocated``) and
the prediction: on a CPU ``bytes`` (one memory), on CUDA ``device_bytes``, with the image in
host memory (pinned) as the model assumes for an accelerator, and with ``--output-device cpu``
the trunk output, its gradient and the head on the host.

The network is benchmarks/models.py's (a torchvision ResNet trunk, average pool, linear
head, eval-mode BatchNorm), float32, batch 1, cross-entropy against one label.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fxstream

import models  # noqa: E402

import fxstream  # noqa: E402
from fxstream.cli.report import build as build_report  # noqa: E402
from fxstream.memory import truth as memtruth  # noqa: E402

SCHEDULES = ("plain", "recompute", "device", "host", "banded")
MIB = 1 << 20


def schedule_of(name: str, band_rows: int | None):
    if name == "recompute":
        return fxstream.Schedule("recompute")
    return fxstream.Schedule("carry", stripes=name, band_rows=band_rows if name == "banded" else None)


def run_one(args, name: str) -> dict:
    """One schedule in this process: time, measured and predicted peak."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    net = models.build(args.arch, device=args.device)
    shape = (1, 3, args.size, args.size)
    x = _image(shape)
    if cuda and name != "plain":  # the image in host memory, as the model assumes on an accelerator
        x = x.pin_memory()
    else:
        x = x.to(device)
    head_on_host = args.output_device == "cpu" and name != "plain"
    target = torch.tensor([3], device="cpu" if head_on_host else device)
    result = {"schedule": name, "device": args.device, "arch": args.arch, "size": args.size, "tile": args.tile}
    if name == "plain":
        model, predicted = net, None
    else:
        model = fxstream.compile(
            net, tile_size=args.tile, schedule=schedule_of(name, args.band_rows), output_device=args.output_device
        )
        if head_on_host:
            net.fc.to("cpu")  # the head runs where the trunk output is
        report = build_report(model, shape, torch.float32, device=device.type)
        training = report["memory"]["streamed"]["training"]
        predicted = training["device_bytes"]
        result.update(
            grid=report["grid"],
            stripes=report["stripes"],
            bands=report["bands"],
            predicted_step_ratio=report["predicted_step_ratio"],
            predicted_bytes=predicted,
            predicted_phase=training["device_phase"],
            predicted_parts=training["device_parts"],
            predicted_host_bytes=training["host_bytes"],
        )
    if name == "plain":
        result["predicted_bytes"] = predicted = _plain_prediction(args, net, shape, device)

    def step():
        out = model(x)
        F.cross_entropy(out, target).backward()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(1 + args.reps):
        net.zero_grad(set_to_none=True)
        start = time.perf_counter()
        step()
        sync()
        if i:
            times.append(time.perf_counter() - start)
    result["time_s"] = statistics.median(times) if times else None
    result["times_s"] = times
    if not args.no_memory:
        net.zero_grad(set_to_none=True)
        resident = [*net.parameters(), *net.buffers()] + ([x] if x.device == device else [])
        resident = [t for t in resident if t.device == device]
        truth = memtruth.measure(step, resident=resident, device=device)
        result["measured_bytes"] = truth.total
        result["measured_phase"] = truth.phase
        result["ratio"] = truth.total / predicted if predicted else None
    if model is not net:
        result["rebuild_tiles"] = model.last_stats.rebuild_tiles
    result["host_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result


def interleaved(args) -> list[dict]:
    """Step times only, every schedule in this one process, one step of each in turn per
    round (after a warm-up round): on a shared machine the load then weighs on all alike."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net = models.build(args.arch, device=args.device)
    shape = (1, 3, args.size, args.size)
    x = _image(shape).to(device)
    target = torch.tensor([3], device=device)
    runs = {}
    for name in args.schedules:
        if name == "plain":
            runs[name] = (net, None)
            continue
        model = fxstream.compile(net, tile_size=args.tile, schedule=schedule_of(name, args.band_rows))
        report = build_report(model, shape, torch.float32, device=device.type)
        runs[name] = (model, report)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict = {name: [] for name in runs}
    for round_ in range(1 + args.reps):
        for name, (model, _) in runs.items():
            net.zero_grad(set_to_none=True)
            start = time.perf_counter()
            F.cross_entropy(model(x), target).backward()
            sync()
            if round_:
                times[name].append(time.perf_counter() - start)
    results = []
    for name, (_, report) in runs.items():
        result = {"schedule": name, "arch": args.arch, "size": args.size, "tile": args.tile, "interleaved": True}
        result.update(time_s=statistics.median(times[name]), times_s=times[name])
        if report is not None:
            result.update(
                stripes=report["stripes"], bands=report["bands"], predicted_step_ratio=report["predicted_step_ratio"]
            )
        result["host_peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        results.append(result)
    return results


def _image(shape: tuple[int, ...]) -> torch.Tensor:
    """A random float32 image; beyond 4096² a random 4096² block repeated (drawing 3 * 32768²
    normal numbers on one core takes longer than the step)."""
    block = tuple(min(n, 4096) for n in shape[2:])
    x = torch.randn(*shape[:2], *block, generator=torch.Generator().manual_seed(1))
    if block == tuple(shape[2:]):
        return x
    reps = [-(-n // b) for n, b in zip(shape[2:], block)]
    return x.repeat(1, 1, *reps)[(..., *(slice(0, n) for n in shape[2:]))].contiguous()


def _plain_prediction(args, net, shape, device) -> int:
    """The memory model's plain prediction (everything on the device)."""
    smodel = fxstream.compile(net, tile_size=args.tile, schedule="recompute")
    return build_report(smodel, shape, torch.float32, device="cpu")["memory"]["plain"]["training"]["bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet18", choices=sorted(models.ARCHS))
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    parser.add_argument("--band-rows", type=int, default=None)
    parser.add_argument("--output-device", default=None, help="e.g. cpu: the trunk output and the head on the host")
    parser.add_argument("--reps", type=int, default=2, help="timed steps after the warm-up (0: none)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU timing: 1)")
    parser.add_argument("--no-memory", action="store_true", help="skip the measured step")
    parser.add_argument("--json", help="append the results to this file (one JSON object per line)")
    parser.add_argument(
        "--dry-run", action="store_true", help="small sizes on the CPU, no recompute: check the script runs (~1 min)"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="times only, all schedules in one process, one step of each per round (fair ratios under load)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.dry_run:  # two tile rows (two bands of one row), one timed step; recompute's halo is too slow here
        args.device, args.arch, args.size, args.tile, args.reps, args.threads = "cpu", "resnet18", 768, 480, 1, 1
        args.band_rows = 1
        if "--schedules" not in sys.argv:
            args.schedules = [s for s in SCHEDULES if s != "recompute"]
    if args.child:
        print("RESULT " + json.dumps(run_one(args, args.child)), flush=True)
        return
    if args.interleave:
        results = interleaved(args)
        for r in results:
            _print(r, results)
        _write(args.json, results)
        return
    results = []
    for name in args.schedules:
        argv = [sys.executable, __file__, *sys.argv[1:], "--child", name]  # --dry-run applies in the child too
        done = subprocess.run(argv, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{name}: FAILED (exit {done.returncode})\n{done.stderr[-1500:]}", flush=True)
            results.append({"schedule": name, "failed": True})
            continue
        results.append(json.loads(lines[-1][len("RESULT ") :]))
        _print(results[-1], results)
    _write(args.json, results)
    if any(r.get("failed") for r in results):
        raise SystemExit(1)


def _write(path: str | None, results: list) -> None:
    if path:
        with open(path, "a") as file:
            for r in results:
                file.write(json.dumps(r) + "\n")


def _print(r: dict, results: list) -> None:
    plain = next((p for p in results if p["schedule"] == "plain" and p.get("time_s")), None)
    ratio = f"{r['time_s'] / plain['time_s']:.2f}x plain" if plain and r.get("time_s") else ""
    predicted_ratio = f" (predicted {r['predicted_step_ratio']:.2f}x)" if "predicted_step_ratio" in r else ""
    time_s = f"{r['time_s']:.2f} s/step {ratio}{predicted_ratio}" if r.get("time_s") else "untimed"
    memory = ""
    if "measured_bytes" in r:
        memory = (
            f"; peak {r['measured_bytes'] / MIB:.0f} MiB measured, {r['predicted_bytes'] / MIB:.0f} MiB predicted "
            f"(ratio {r['ratio']:.2f})"
        )
    where = f" [{r['stripes']}, {r['bands']} bands]" if r.get("stripes") else ""
    rss = f"; host peak RSS {r['host_peak_rss'] / 2**30:.1f} GiB" if not r.get("interleaved") else ""
    print(f"{r['schedule']:9s}{where}: {time_s}{memory}{rss}", flush=True)


if __name__ == "__main__":
    main()
