"""A trunk with several outputs: smp DeepLabV3Plus (ResNet-18 encoder, output stride 16),
one training step on one image, side by side in fresh processes.

* ``plain``: autograd on the model.
* ``checkpoint``: ``torch.utils.checkpoint`` around the encoder (its list of feature maps).
* ``fxstream``: ``fxstream.compile(model, tile_size, boundary="encoder")``: the encoder is
  streamed to its two outputs the decoder reads (stride 4 and 16), the decoder runs plain.

Peak memory is the peak RSS of the step's process (VmHWM, reset after building the model and
the input; ``MALLOC_MMAP_THRESHOLD_`` so that freed tensors leave the RSS), time is one step
after one warm-up step. Gradient error: max relative error of every parameter gradient against
plain autograd, same process.

    python benchmarks/multi_output.py --size 2048 --tile 1024 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F


def build():
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    return smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=2).eval()


def prepare(method: str, model, tile: int):
    if method == "plain":
        return model
    if method == "checkpoint":
        from torch.utils.checkpoint import checkpoint

        encoder = model.encoder

        class Checkpointed(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, x):
                features = checkpoint(encoder, x, use_reentrant=False)
                out = model.decoder(features)
                return model.segmentation_head(out)

        return Checkpointed()
    import fxstream

    return fxstream.compile(model, tile_size=tile, boundary="encoder")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _status(field: str) -> int:
    """A byte count from /proc/self/status: ``VmHWM`` (peak RSS) or ``VmRSS``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(method: str, size: int, tile: int, threads: int) -> dict:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    model = build()
    runner = prepare(method, model, tile)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, size, size, generator=gen)
    target = torch.randint(0, 2, (1, size, size), generator=gen)

    def step():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(runner(x), target)
        loss.backward()

    step()  # warm-up (fxstream: the tiling of this size)
    base = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    step()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - base
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    error = None
    if method != "plain":
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), target).backward()
        error = max(((grads[n] - p.grad).abs().max() / p.grad.abs().max()).item() for n, p in model.named_parameters())
    info = {}
    if method == "fxstream":
        shape = runner.shape_plan(size, size)
        info = {"tiles": shape.num_tiles, "outputs": list(runner.program().geometry.outputs)}
    return {"method": method, "seconds": seconds, "peak_bytes": peak, "grad_error": error, **info}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=["plain", "checkpoint", "fxstream"])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.tile, args.threads)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(256 * 1024), "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for method in args.methods:
        cmd = [sys.executable, __file__, "--worker", method, "--size", str(args.size), "--tile", str(args.tile)]
        cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    plain = next((r for r in rows if r["method"] == "plain"), None)
    print(f"\nDeepLabV3Plus(resnet18), 1x3x{args.size}x{args.size}, tile {args.tile}, {args.threads} thread(s)")
    print("| method | time / step | x plain | peak RSS | x plain | grad err |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        t = f"{r['seconds'] / plain['seconds']:.2f}x" if plain else "-"
        m = f"{r['peak_bytes'] / plain['peak_bytes']:.2f}x" if plain else "-"
        err = "" if r["grad_error"] is None else f"{r['grad_error']:.1e}"
        name = r["method"] + (f", {r['tiles']} tiles, outputs {len(r['outputs'])}" if "tiles" in r else "")
        print(f"| {name} | {r['seconds']:.1f} s | {t} | {r['peak_bytes'] / 2**30:.3f} GiB | {m} | {err} |")


if __name__ == "__main__":
    main()
