"""Gigapixel training steps on CPU, and peak memory against image side.

**Steps** (``step``): one training step (forward + backward of a cross-entropy loss, batch 1,
float32, eval-mode BatchNorm) of a model on a ``side``² RGB uint8 image read lazily, tile by
tile, from a raw memmap or a tiled TIFF (``fxstream.Normalize(scale=1/255)`` converts each
tile), under each schedule. Each measurement runs in a fresh process with one thread:

* ``rss``: the rise of the peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over
  the RSS before the step, and the peak of the anonymous RSS (``RssAnon``, sampled every
  20 ms by a thread: the image pages a memmap maps are file-backed and count in ``VmHWM``
  but not here), and the step's wall time. A warm-up step on a small image and the
  planning of the full size (``smodel.shape_plan``) run before the baseline;
* ``truth``: the tensor peak of the step (``fxstream.memory.truth``: the live tensor bytes
  allocated during it, from the profiler's allocation events), in another process;
* the prediction: ``fxstream plan``'s memory model (``memory.streamed.training``) less its
  ``input`` part (the image is read lazily, never held), computed in the parent process.

Models: ``small``, a 3-convolution CNN (stride 16, 32 channels out), and ``resnet18``
(benchmarks/models.py: torchvision ResNet-18, the whole trunk streamed).

**Figure** (``figure``): peak memory of one ResNet-18 training step against the image side,
1k to 100k: plain autograd, ``torch.utils.checkpoint`` (``checkpoint_sequential``, 8 segments
over the trunk's blocks, benchmarks/methods.py) and fxstream under each schedule (tile
``--tile``). Measured (filled markers): the tensor peak (``truth.total``: the peak plus the
parameters and buffers) at the small sides, each in a fresh process with one thread, the
image a float32 tensor. Predicted (open markers, dashed): fxstream and plain from the memory
model; checkpointing has no model in fxstream, so its line beyond the measured sides is the
least-squares fit ``a + b * pixels`` of its measured points (every tensor it keeps scales
with the pixels). The image itself is left out of every figure (a dotted line shows its
float32 size): a plain or checkpointed step must hold it, fxstream reads it lazily.

    python benchmarks/gigapixel.py step --model small --side 32768 --tile 4096
    python benchmarks/gigapixel.py step --model resnet18 --side 8192 --tile 2048
    python benchmarks/gigapixel.py figure --out docs/memory-vs-side.png

docs/memory-vs-side.png: ``figure --plain-sides 1024 2048 --measure-sides 1024 2048 3072
--json benchmarks/results/memory-vs-side.json`` (about 5 minutes on one core; with two
checkpoint points the fit goes through both).

``--json FILE`` writes the results; ``figure --from FILE`` redraws from saved results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # this checkout's fxstream

from procmem import reset_peak, status_bytes  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30
FIGURE_SIDES = (1024, 1448, 2048, 2896, 4096, 5792, 8192, 11585, 16384, 23170, 32768, 46341, 65536, 100_000)


# --- models ----------------------------------------------------------------------------------


def small_cnn():
    """3x3 convolutions 3->8 (stride 2), 8->16 (stride 2), 16->32, with max pooling: stride 16,
    32 channels out (0.5 bytes per input pixel in float32); average pool and a linear head."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 2),
    ).eval()


def build(name: str):
    import models

    return small_cnn() if name == "small" else models.build(name)


# --- process memory ------------------------------------------------------------------------


class AnonPeak:
    """The largest ``RssAnon`` seen by a thread that reads it every ``interval`` seconds."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self):
        self.start = self.peak = status_bytes("RssAnon")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, status_bytes("RssAnon"))

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, status_bytes("RssAnon"))
        return False


# --- the image -------------------------------------------------------------------------------


def image_file(side: int, source: str, folder: str) -> str:
    """A (1, 3, side, side) uint8 raw file of smooth noise (written once, row band by band),
    and for ``tiff`` a tiled BigTIFF of the same pixels next to it."""
    import numpy as np

    raw = os.path.join(folder, f"image-{side}.u8")
    if not os.path.exists(raw):
        out = np.memmap(raw + ".part", dtype=np.uint8, mode="w+", shape=(1, 3, side, side))
        rng = np.random.default_rng(0)
        band = 1024
        for y in range(0, side, band):
            h = min(band, side - y)
            out[0, :, y : y + h] = rng.integers(0, 256, size=(3, h, side), dtype=np.uint8)
        out.flush()
        del out
        os.replace(raw + ".part", raw)
    if source == "memmap":
        return raw
    tiff = raw + ".tif"
    if not os.path.exists(tiff):
        import tifffile

        data = np.memmap(raw, dtype=np.uint8, mode="r", shape=(1, 3, side, side))
        with tifffile.TiffWriter(tiff + ".part", bigtiff=True) as tw:
            tiles = (
                np.ascontiguousarray(data[0, :, y : y + 512, x : x + 512].transpose(1, 2, 0))
                for y in range(0, side, 512)
                for x in range(0, side, 512)
            )
            tw.write(tiles, shape=(side, side, 3), dtype=np.uint8, tile=(512, 512), photometric="rgb")
        os.replace(tiff + ".part", tiff)
    return tiff


def open_source(path: str, side: int, source: str):
    import numpy as np

    import fxstream

    if source == "memmap":
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(1, 3, side, side))
    return fxstream.open_image(path)


# --- one step (in a fresh process) -----------------------------------------------------------


def schedule_arg(schedule: str):
    """A schedule name, or ``carry:PLACEMENT`` for a stripe placement of fxstream.Schedule."""
    import fxstream

    if ":" not in schedule:
        return schedule
    kind, stripes = schedule.split(":")
    return fxstream.Schedule(kind, stripes=stripes)


def child_step(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    import fxstream
    from fxstream.memory import truth as memtruth

    torch.set_num_threads(1)
    net = build(args.model)
    smodel = fxstream.compile(
        net,
        tile_size=args.tile,
        schedule=schedule_arg(args.schedule),
        input_transform=fxstream.Normalize(scale=1 / 255),
    )
    target = torch.tensor([1])

    def step(x):
        F.cross_entropy(smodel(x), target).backward()

    warm = np.zeros((1, 3, args.tile + 256, args.tile + 256), dtype=np.uint8)
    step(warm)  # code pages, thread pools, the allocator's first arenas
    net.zero_grad(set_to_none=True)
    start = time.perf_counter()
    shape = smodel.shape_plan(args.side, args.side)
    plan_seconds = time.perf_counter() - start
    x = open_source(args.path, args.side, args.source)
    result = {"tiles": shape.num_tiles, "grid": list(shape.grid), "plan_seconds": plan_seconds}
    if args.measure == "truth":
        truth = memtruth.measure(lambda: step(x), resident=[*net.parameters(), *net.buffers()])
        result.update(tensor_peak=truth.peak, tensor_total=truth.total, peak_phase=truth.phase)
        return result
    baseline = status_bytes("VmRSS")
    reset_peak()
    with AnonPeak() as anon:
        start = time.perf_counter()
        step(x)
        seconds = time.perf_counter() - start
    result.update(
        rss_before=baseline,
        rss_rise=status_bytes("VmHWM") - baseline,
        anon_rise=anon.peak - anon.start,
        seconds=seconds,
    )
    return result


def predict(model: str, side: int, tile: int, schedule: str) -> dict:
    """The memory model's streamed and plain training peaks, less the image (read lazily)."""
    import torch

    import fxstream
    from fxstream.cli.report import memory_model

    torch.set_num_threads(1)
    smodel = fxstream.compile(build(model), tile_size=tile, schedule=schedule_arg(schedule))
    memory, _ = memory_model(smodel, (1, 3, side, side), torch.float32)
    e = memory.estimate((side, side))
    return {
        "predicted": e.streamed_training.total - e.streamed_training.parts.get("input", 0),
        "predicted_parts": e.streamed_training.parts,
        "predicted_plain": e.plain_training.total - e.plain_training.parts.get("input", 0),
    }


def run_child(argv: list[str], env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, *argv],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode:
        raise SystemExit(f"child {argv} failed:\n{proc.stdout}{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def steps(args: argparse.Namespace) -> list[dict]:
    os.makedirs(args.data, exist_ok=True)
    path = image_file(args.side, args.source, args.data)
    results = []
    print(
        f"{args.model}, {args.side}² uint8 image from a {args.source} ({os.path.getsize(path) / MIB:,.0f} MiB), "
        f"tile {args.tile}, one thread per process"
    )
    for schedule in args.schedules:
        common = ["--model", args.model, "--side", str(args.side), "--tile", str(args.tile)]
        common += ["--schedule", schedule, "--source", args.source, "--path", path]
        r = {"model": args.model, "side": args.side, "tile": args.tile, "schedule": schedule, "source": args.source}
        r.update(predict(args.model, args.side, args.tile, schedule))
        r.update(run_child(["_step", "--measure", "rss", *common]))
        if not args.no_truth:
            truth = run_child(["_step", "--measure", "truth", *common])
            r.update(tensor_peak=truth["tensor_peak"], tensor_total=truth["tensor_total"])
        results.append(r)
        truth_text = f"tensor peak {r['tensor_total'] / MIB:7.0f} MiB" if "tensor_total" in r else ""
        print(
            f"  {schedule:<14} {r['tiles']:>5} tiles  {r['seconds']:7.1f} s  RSS +{r['rss_rise'] / MIB:7.0f} MiB "
            f"(anon +{r['anon_rise'] / MIB:6.0f})  {truth_text}  predicted {r['predicted'] / MIB:7.0f} MiB  "
            f"(plain predicted {r['predicted_plain'] / GIB:.1f} GiB)",
            flush=True,
        )
    return results


# --- the figure --------------------------------------------------------------------------------


METHOD_NAMES = ("plain", "checkpoint", "carry", "recompute")


def child_truth(args: argparse.Namespace) -> dict:
    """Tensor peak of one ResNet-18 step of ``args.method`` on a float32 ``side``² tensor."""
    import methods
    import models
    import torch

    from fxstream.memory import truth as memtruth

    torch.set_num_threads(1)
    net = models.build("resnet18")
    setting = methods.Setting(upto="layer4", tile=args.tile, size=(args.side, args.side))
    if args.method in ("carry", "recompute"):
        prepared = methods.fxstream(net, setting, args.method)
    else:
        prepared = methods.METHODS[args.method](net, setting)
    x = torch.randn(1, 3, args.side, args.side, generator=torch.Generator().manual_seed(1))
    target = torch.tensor([3])
    prepared.step(torch.randn(1, 3, 96, 96), target)  # warm-up (and the checkpoint copy's lazy state)
    prepared.module.zero_grad(set_to_none=True)
    resident = [*prepared.module.parameters(), *prepared.module.buffers()]
    start = time.perf_counter()
    truth = memtruth.measure(lambda: prepared.step(x, target), resident=resident)
    return {"tensor_total": truth.total, "seconds": time.perf_counter() - start}


def figure_data(args: argparse.Namespace) -> dict:
    import torch

    import fxstream
    from fxstream.cli.report import memory_model

    torch.set_num_threads(1)
    data: dict = {"tile": args.tile, "sides": list(FIGURE_SIDES), "measured": {}, "predicted": {}}
    for method in METHOD_NAMES:
        sides = args.measure_sides if method in ("carry", "recompute") else args.plain_sides
        data["measured"][method] = {}
        for side in sides:
            r = run_child(["_truth", "--method", method, "--side", str(side), "--tile", str(args.tile)])
            # the image tensor exists before the measured call: truth counts neither it nor (as
            # resident) anything but the parameters and buffers, like the prediction less its input
            data["measured"][method][side] = r["tensor_total"]
            print(
                f"  measured {method:<10} {side:>6}: {data['measured'][method][side] / MIB:8.0f} MiB "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
    import models

    net = models.build("resnet18")
    for schedule in ("carry", "recompute"):
        smodel = fxstream.compile(net, tile_size=args.tile, schedule=schedule)
        memory, _ = memory_model(smodel, (1, 3, args.tile, args.tile), torch.float32)
        measured_sides = {int(k) for m in data["measured"].values() for k in m}
        estimates = {side: memory.estimate((side, side)) for side in sorted(set(FIGURE_SIDES) | measured_sides)}
        data["predicted"][schedule] = {
            s: e.streamed_training.total - e.streamed_training.parts["input"] for s, e in estimates.items()
        }
        data["predicted"]["plain"] = {
            s: e.plain_training.total - e.plain_training.parts["input"] for s, e in estimates.items()
        }
    points = data["measured"]["checkpoint"]
    a, b = _fit([s * s for s in points], list(points.values()))
    data["predicted"]["checkpoint"] = {s: a + b * s * s for s in sorted(set(FIGURE_SIDES) | set(points))}
    data["checkpoint_fit"] = {"bytes": a, "bytes_per_pixel": b}
    data["image"] = {s: 3 * s * s * 4 for s in FIGURE_SIDES}
    return data


def _fit(x: list, y: list) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sum((xi - mx) ** 2 for xi in x)
    return my - b * mx, b


def draw(data: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {
        "plain": ("plain autograd", "tab:red"),
        "checkpoint": ("torch.utils.checkpoint (8 segments)", "tab:orange"),
        "carry": (f"fxstream carry (tile {data['tile']})", "tab:blue"),
        "recompute": (f"fxstream recompute (tile {data['tile']})", "tab:green"),
    }
    fig, ax = plt.subplots(figsize=(8, 5))
    for method, (label, color) in styles.items():
        measured = {int(k): v for k, v in data["measured"][method].items()}
        predicted = {int(k): v for k, v in data["predicted"][method].items()}
        beyond = sorted(s for s in predicted if s >= max(measured))
        ax.plot(beyond, [predicted[s] / GIB for s in beyond], "--", marker="o", mfc="white", color=color)
        xs = sorted(measured)
        ax.plot(xs, [measured[s] / GIB for s in xs], "-", marker="o", color=color, label=label)
    image = {int(k): v for k, v in data["image"].items()}
    xs = sorted(image)
    ax.plot(xs, [image[s] / GIB for s in xs], ":", color="gray", label="the image itself (float32; not counted)")
    ax.plot([], [], "-", marker="o", color="black", label="measured: tensor peak, CPU, one thread")
    ax.plot([], [], "--", marker="o", mfc="white", color="black", label="predicted: memory model (checkpoint: fit)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image side (px), square RGB image")
    ax.set_ylabel("peak tensor memory of one training step (GiB)")
    ax.set_title(
        "ResNet-18, batch 1, float32: measured (filled, tensor peak, CPU) and predicted (open, dashed)", fontsize=9
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- command line --------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("step", help="one training step on a side² image read lazily")
    p.add_argument("--model", choices=("small", "resnet18"), default="small")
    p.add_argument("--side", type=int, default=32768)
    p.add_argument("--tile", type=int, default=4096)
    p.add_argument("--schedules", nargs="*", default=["carry", "recompute"])
    p.add_argument("--source", choices=("memmap", "tiff"), default="memmap")
    p.add_argument("--data", default="/tmp/fxstream-gigapixel", help="folder for the image files")
    p.add_argument("--no-truth", action="store_true", help="skip the tensor-peak runs")
    p.add_argument("--json")
    f = sub.add_parser("figure", help="peak memory against image side")
    f.add_argument("--tile", type=int, default=1024)
    f.add_argument("--plain-sides", type=int, nargs="*", default=[1024, 2048, 3072])
    f.add_argument("--measure-sides", type=int, nargs="*", default=[1024, 2048, 3072, 4096])
    f.add_argument("--out", default=str(HERE.parent / "docs" / "memory-vs-side.png"))
    f.add_argument("--from", dest="source", help="redraw from this JSON (written by --json)")
    f.add_argument("--json")
    c = sub.add_parser("_step")
    c.add_argument("--measure", choices=("rss", "truth"))
    for name in ("--model", "--schedule", "--source", "--path"):
        c.add_argument(name)
    c.add_argument("--side", type=int)
    c.add_argument("--tile", type=int)
    t = sub.add_parser("_truth")
    t.add_argument("--method")
    t.add_argument("--side", type=int)
    t.add_argument("--tile", type=int)
    args = parser.parse_args()
    if args.command == "_step":
        print(json.dumps(child_step(args)))
        return
    if args.command == "_truth":
        print(json.dumps(child_truth(args)))
        return
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    if args.command == "step":
        results = steps(args)
    else:
        if args.source:
            results = json.loads(Path(args.source).read_text())
        else:
            results = figure_data(args)
        draw(results, args.out)
        print(f"figure: {args.out}")
    print(f"({machine}, {time.strftime('%Y-%m-%d %H:%M')})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
