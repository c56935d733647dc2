"""Where the first training step's resident memory goes, on CPU: RSS and the tensor peak per
step, under the allocator settings a user can choose.

Each measurement runs in a fresh process (one thread), which:

1. builds the model and the image, runs one plain training step on a 96x96 image (so that
   the kernels' code pages and thread pools are not counted);
2. plans: ``smodel.program()`` and ``smodel.shape_plan(H, W)`` (trace, plan, tiling);
3. runs ``--steps`` training steps; before each, ``/proc/self/clear_refs`` resets the
   high-water mark ``VmHWM`` to the current RSS.

Per phase it reports, in MiB: ``rise``, the peak RSS of the phase minus the RSS before it;
``peak``, the peak RSS of the phase minus the RSS before the first step (what the process
holds at most, over the steps so far, above its pre-training size); ``after``, the RSS
after the phase minus that same baseline. With ``--truth`` it runs the steps under
``fxstream.memory.truth.measure`` instead and reports each step's tensor peak (the live
tensor bytes allocated during the step, allocator-independent), with no RSS.

    python benchmarks/first_step.py                                   # the default matrix
    python benchmarks/first_step.py --cases prefix --schedules carry --allocators default jemalloc

Cases (float32, eval-mode BatchNorm): ``prefix``: ResNet-18 conv1..layer2 streamed, 2048²,
tile 1024 (issue 18's case); ``resnet18``: the whole trunk streamed, 1536², tile 512.
Allocators: the glibc default, glibc with ``MALLOC_MMAP_THRESHOLD_`` fixed at 256 KiB (or
with ``MALLOC_TRIM_THRESHOLD_``, or ``MALLOC_ARENA_MAX``), and jemalloc or tcmalloc through
``LD_PRELOAD`` (Debian: ``apt install libjemalloc2 libtcmalloc-minimal4``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's fxstream

from procmem import reset_peak, status_bytes  # noqa: E402

MIB = 1 << 20
CASES = {
    # name: (arch, boundary, image side, tile)
    "prefix": ("resnet18", "trunk.layer2", 2048, 1024),
    "resnet18": ("resnet18", None, 1536, 512),
}
LIBS = {
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}
ALLOCATORS = {
    "default": {},
    "mmap256k": {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)},
    "mmap4m": {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)},
    "trim0": {"MALLOC_TRIM_THRESHOLD_": "0"},
    "trim128k": {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)},
    "arena1": {"MALLOC_ARENA_MAX": "1"},
    "trim-per-tile": {"FIRST_STEP_TRIM_PER_TILE": "1"},
    "jemalloc": {"LD_PRELOAD": LIBS["jemalloc"]},
    "tcmalloc": {"LD_PRELOAD": LIBS["tcmalloc"]},
}


def trim_per_tile() -> None:
    """Call glibc's ``malloc_trim(0)`` before every tile of every pass: the free pages of
    the heap go back to the OS (an experiment; fxstream does not do this)."""
    import ctypes

    from fxstream.runtime.codegen import StreamedTrunk

    trim = ctypes.CDLL("libc.so.6").malloc_trim
    tiles = StreamedTrunk.tiles

    def trimmed(self, *args, **kwargs):
        for item in tiles(self, *args, **kwargs):
            trim(0)
            yield item

    StreamedTrunk.tiles = trimmed


def child(args: argparse.Namespace) -> None:
    import models
    import torch
    import torch.nn.functional as F

    import fxstream
    from fxstream.memory import truth as memtruth

    torch.set_num_threads(1)
    if os.environ.get("FIRST_STEP_TRIM_PER_TILE"):
        trim_per_tile()
    arch, boundary, side, tile = CASES[args.case]
    net = models.build(arch)
    x = torch.randn(1, 3, side, side)
    target = torch.tensor([3])
    schedule = None if args.schedule == "plain" else args.schedule
    smodel = fxstream.compile(net, tile_size=tile, boundary=boundary, schedule=schedule or "carry")
    step_model = net if schedule is None else smodel

    def step():
        F.cross_entropy(step_model(x), target).backward()

    F.cross_entropy(net(torch.randn(1, 3, 96, 96)), target).backward()  # code pages, pools
    net.zero_grad(set_to_none=True)
    result: dict = {"phases": [], "seconds": []}

    def phase(label, fn):
        before = status_bytes("VmRSS")
        reset_peak()
        start = time.perf_counter()
        fn()
        result["seconds"].append(time.perf_counter() - start)
        peak = status_bytes("VmHWM")
        return before, peak, status_bytes("VmRSS")

    if schedule is not None:
        before, peak, after = phase("plan", lambda: (smodel.program(), smodel.shape_plan(side, side)))
        result["plan"] = {"rise": (peak - before) / MIB, "after": (after - before) / MIB}
    base = status_bytes("VmRSS")
    for k in range(args.steps):
        net.zero_grad(set_to_none=True)
        if args.truth:
            truth = memtruth.measure(step, resident=[*net.parameters(), *net.buffers(), x])
            result["phases"].append({"step": k + 1, "tensor peak": truth.peak / MIB})
        else:
            before, peak, after = phase(f"step {k + 1}", step)
            result["phases"].append(
                {
                    "step": k + 1,
                    "rise": (peak - before) / MIB,
                    "peak": (peak - base) / MIB,
                    "after": (after - base) / MIB,
                }
            )
    print(json.dumps(result))


def run(case: str, schedule: str, allocator: str, args: argparse.Namespace, truth: bool = False) -> dict:
    command = [sys.executable, __file__, "--child", "--case", case, "--schedule", schedule, "--steps", str(args.steps)]
    if truth:
        command.append("--truth")
    env = {**os.environ, **ALLOCATORS[allocator], "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise SystemExit(f"{case} {schedule} {allocator}: the child failed\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=["prefix"], choices=list(CASES))
    parser.add_argument("--schedules", nargs="*", default=["carry", "recompute", "plain"])
    parser.add_argument(
        "--allocators",
        nargs="*",
        default=[a for a, env in ALLOCATORS.items() if os.path.exists(env.get("LD_PRELOAD", "/"))],
        choices=list(ALLOCATORS),
        help="default: every one whose library exists",
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-truth", action="store_true", help="skip the tensor-peak runs")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", help=argparse.SUPPRESS)
    parser.add_argument("--truth", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    missing = [a for a in args.allocators if not os.path.exists(ALLOCATORS[a].get("LD_PRELOAD", "/"))]
    if missing:  # a preload that does not exist only warns, and the row would be glibc's
        parser.error(f"{', '.join(LIBS[a] for a in missing)} not found (apt install libjemalloc2 libtcmalloc-minimal4)")
    results = []
    for case in args.cases:
        for schedule in args.schedules:
            if not args.no_truth:
                t = run(case, schedule, "default", args, truth=True)
                peaks = " ".join(f"{p['tensor peak']:6.0f}" for p in t["phases"])
                print(f"{case:9s} {schedule:9s} {'tensor peak':11s} steps: {peaks}", flush=True)
                results.append({"case": case, "schedule": schedule, "allocator": "truth", **t})
            for allocator in args.allocators:
                r = run(case, schedule, allocator, args)
                results.append({"case": case, "schedule": schedule, "allocator": allocator, **r})
                plan = f"plan +{r['plan']['rise']:4.0f}" if "plan" in r else " " * 10
                steps = "  ".join(
                    f"rise {p['rise']:5.0f} peak {p['peak']:5.0f} after {p['after']:5.0f}" for p in r["phases"]
                )
                seconds = " ".join(f"{t:.1f}" for t in r["seconds"][-args.steps :])
                print(f"{case:9s} {schedule:9s} {allocator:11s} {plan} | {steps} | s/step {seconds}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
