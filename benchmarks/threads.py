"""CPU threads against free cores: seconds per training step, plain and streamed.

A multi-threaded (OpenMP) CPU step waits at every op's barrier for all of its threads. When
the process has more intra-op threads than cores free for it (other jobs, a CPU affinity
mask, a container quota), a thread that the kernel has descheduled holds up the others,
and the step pays that wait once per parallel op. A streamed step runs many more, smaller
ops than a plain one, so it pays far more often.

Each condition runs in a fresh process: ``--threads`` intra-op threads, optionally with
``--busy`` competing processes (each a one-thread matmul loop, started by this script), an
affinity mask of ``--cores`` cores (``os.sched_setaffinity``), and extra environment
(``OMP_WAIT_POLICY=PASSIVE``). The child times a plain step and a streamed (carry) step of
the demo model (examples/demo.py: ResNet-18, eval mode) alternately, after one warm-up
step of each, and reports the fastest of ``--reps``.

    python benchmarks/threads.py                       # the default conditions
    python benchmarks/threads.py --size 640x480 --reps 1 --conditions t1 t2 t2+busy1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name: (threads, competing busy processes, cores in the affinity mask or None, extra env)
CONDITIONS = {
    "t1": (1, 0, None, {}),
    "t2": (2, 0, None, {}),
    "t1+busy1": (1, 1, None, {}),
    "t2+busy1": (2, 1, None, {}),
    "t2+busy1 passive": (2, 1, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t2 on 1 core": (2, 0, 1, {}),
    "t1 on 1 core": (1, 0, 1, {}),
    "t2 passive": (2, 0, None, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "t2 on 1 core passive": (2, 0, 1, {"OMP_WAIT_POLICY": "PASSIVE"}),
}

BUSY = """
import torch
torch.set_num_threads(1)
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def child(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT))
    import demo

    import fxstream

    if args.cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cores])
    torch.set_num_threads(args.threads)
    height, width = demo.parse_size(args.size)
    model = demo.build_model(torch.float32)
    streamed = fxstream.compile(model, tile_size=args.tile_size)
    x, target = demo.synthetic_batch((height, width), torch.float32)
    nets = {"plain": model, "carry": streamed}
    times = {name: [] for name in nets}
    for rep in range(args.reps + 1):  # the first round warms up (allocator, kernels)
        for name, net in nets.items():
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            F.cross_entropy(net(x), target).backward()
            if rep:
                times[name].append(time.perf_counter() - start)
    print(json.dumps({name: min(t) for name, t in times.items()}))


def run(name: str, args: argparse.Namespace) -> dict:
    threads, busy, cores, env = CONDITIONS[name]
    competitors = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(busy)]
    try:
        time.sleep(2 if busy else 0)
        load_before = os.getloadavg()[0]
        command = [sys.executable, __file__, "--child", "--threads", str(threads), "--size", args.size]
        command += ["--tile-size", str(args.tile_size), "--reps", str(args.reps)]
        if cores:
            command += ["--cores", str(cores)]
        start = time.perf_counter()
        proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=False)
        wall = time.perf_counter() - start
    finally:
        for p in competitors:
            p.kill()
            p.wait()
    if proc.returncode:
        raise SystemExit(f"{name}: the child failed\n{proc.stdout}{proc.stderr}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"condition": name, **result, "load before": load_before, "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--conditions", nargs="*", default=list(CONDITIONS), choices=list(CONDITIONS))
    parser.add_argument("--size", default="1280x960")
    parser.add_argument("--tile-size", type=int, default=320)
    parser.add_argument("--reps", type=int, default=1, help="timed rounds after the warm-up round")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--cores", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    cpus = f"{os.cpu_count()} CPUs, affinity {len(os.sched_getaffinity(0))}"
    print(f"{cpus}; image {args.size}, carry tile {args.tile_size}")
    print(f"{'condition':<18} {'plain s':>8} {'carry s':>8} {'carry/plain':>11} {'load1 before':>12}")
    results = []
    for name in args.conditions:
        r = run(name, args)
        results.append(r)
        print(
            f"{name:<18} {r['plain']:8.2f} {r['carry']:8.2f} {r['carry'] / r['plain']:11.2f} {r['load before']:12.2f}",
            flush=True,
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
