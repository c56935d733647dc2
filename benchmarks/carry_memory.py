"""Tensor peak of one training step under each schedule, measured (fxstream.memory.truth)
against predicted (``fxstream plan``'s ``memory.streamed.training.bytes``), and where the
peak comes from: by phase and by owner.

    python benchmarks/carry_memory.py                    # the three cases of issue 18
    python benchmarks/carry_memory.py --cases unet --detail

Cases (float32, CPU, one thread, eval-mode BatchNorm):

* ``prefix``: ResNet-18 conv1..layer2 streamed (``boundary="trunk.layer2"``), the rest plain,
  2048², tile 1024;
* ``resnet18``: ResNet-18 conv1..layer4 streamed, 1536², tile 512;
* ``unet``: a 3-level U-Net (ConvTranspose ups, width 8), 1024², tile 256.

Phases are marked by wrapping the executor (``--detail``): ``forward tile p``, ``kept tile p``
(the last forward tile, run with autograd), ``head``, ``backward tile p`` (recompute) and
``grad tile p`` (``autograd.grad``). Owners: the stripe store and the pending gradients are
summed from the executor's own dicts at each mark; the live set at the peak is classified
by the operator that allocated it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's fxstream

import models  # noqa: E402

import fxstream  # noqa: E402
from fxstream.cli.report import memory_model  # noqa: E402
from fxstream.memory import truth as memtruth  # noqa: E402
from fxstream.runtime import executor  # noqa: E402

MIB = 1 << 20


def _unet():
    from dense_zoo import UNet

    torch.manual_seed(0)
    return UNet(in_ch=3, classes=2, base=8, depth=3, up="transpose").eval()


CASES = {
    # name: (builder, boundary, image size, tile, loss)
    "prefix": (lambda: models.build("resnet18"), "trunk.layer2", 2048, 1024, "class"),
    "resnet18": (lambda: models.build("resnet18"), None, 1536, 512, "class"),
    "unet": (_unet, None, 1024, 256, "dense"),
}


def _loss(out: torch.Tensor, kind: str) -> torch.Tensor:
    """Cross-entropy against a label per image, or per pixel for a dense output."""
    if kind == "class":
        return F.cross_entropy(out, torch.tensor([3]))
    return F.cross_entropy(out, torch.zeros(out.shape[:1] + out.shape[2:], dtype=torch.long))


@contextlib.contextmanager
def phase_marks(owners: list):
    """Wrap the executor so that it marks its phases, and record at each mark the bytes
    in the stripe store and in the pending gradients (``owners``: (label, store, pending))."""
    state = {"store": None, "pending": None, "backward": False, "position": None}
    saved = {
        "leaves": executor._leaves,
        "send": executor._send,
        "pending_grads": executor._pending_grads,
        "forward": executor.StreamFunction.forward,
        "backward": executor._backward,
        "run_tile": fxstream.runtime.codegen.StreamedTrunk.run_tile,
    }

    def nbytes(d, nested=False):
        """Bytes of the storages the tensors of ``d`` (the pending gradients, or a stripe store:
        its device window and host copies) hold alive (a view pins its whole base)."""
        if d is None:
            return 0
        if nested:
            tensors = [g for parts in d.values() for ps in parts.values() for _, g in ps]
        else:
            tensors = [*d.live.values(), *getattr(d, "host", {}).values()]
        return memtruth.resident_bytes(tensors)

    def mark(label):
        owners.append((label, nbytes(state["store"]), nbytes(state["pending"], nested=True)))
        memtruth.mark(label)

    def leaves(tile, store, grad):
        state["store"] = store
        return saved["leaves"](tile, store, grad)

    def send(pending, tile, keys, grads):
        state["pending"] = pending
        return saved["send"](pending, tile, keys, grads)

    def pending_grads(pending, run, node_dims):
        mark(f"grad tile {state['position']}")
        yield from saved["pending_grads"](pending, run, node_dims)

    def run_tile(self, x, tile, run, random=None):
        position = 0
        for i, n in zip(tile.index, state["grid"]):
            position = position * n + i
        state["position"] = position
        if state["backward"]:
            kind = "backward"
        else:
            kind = "kept" if torch.is_grad_enabled() else "forward"
        mark(f"{kind} tile {position}")
        return saved["run_tile"](self, x, tile, run, random)

    def forward(ctx, x, trunk, shape_plan, *params):
        state["grid"] = shape_plan.grid
        state["backward"] = False
        out = saved["forward"](ctx, x, trunk, shape_plan, *params)
        mark("head")
        return out

    def backward(ctx, grad_outs):
        state["backward"] = True
        mark("backward")
        try:
            return saved["backward"](ctx, grad_outs)
        finally:
            state["backward"] = False
            mark("after")

    executor._leaves, executor._send, executor._pending_grads = leaves, send, pending_grads
    executor._backward = backward
    executor.StreamFunction.forward = staticmethod(forward)
    fxstream.runtime.codegen.StreamedTrunk.run_tile = run_tile
    try:
        yield
    finally:
        executor._leaves, executor._send = saved["leaves"], saved["send"]
        executor._pending_grads, executor._backward = saved["pending_grads"], saved["backward"]
        executor.StreamFunction.forward = staticmethod(saved["forward"])
        fxstream.runtime.codegen.StreamedTrunk.run_tile = saved["run_tile"]


def classify(a: memtruth.Allocation) -> str:
    """An owner for an allocation alive at the peak, from the operators that made it."""
    stack = " / ".join(a.stack)
    where = "fwd" if a.phase.startswith(("forward", "kept", "head", "start")) else "bwd"
    if "autograd::engine" in stack or "Backward" in stack:
        return f"{where}: autograd backward buffers"
    for op, owner in (
        ("aten::zeros_like", "zeros_like (pending / grad_x)"),
        ("aten::clone", "clone (stripes / leaf copies)"),
        ("aten::cat", "cat (_assemble)"),
        ("aten::constant_pad_nd", "pad copies"),
        ("aten::zeros", "zeros (outputs)"),
        ("aten::new_empty", "output assembly"),
        ("aten::empty_like", "empty_like"),
        ("aten::contiguous", "contiguous"),
    ):
        if op in stack:
            return f"{where}: {owner}"
    top = a.stack[-1] if a.stack else "?"
    return f"{where}: {top}"


def run_case(name: str, schedule: str | None, detail: bool) -> dict:
    build, boundary, size, tile, loss_kind = CASES[name]
    net = build()
    x = torch.randn(1, 3, size, size)
    smodel = fxstream.compile(
        net, tile_size=tile, boundary=boundary, schedule=None if schedule == "plain" else schedule
    )
    model, _ = memory_model(smodel, tuple(x.shape), torch.float32)
    estimate = model.estimate((size, size))
    parts = {"streamed": estimate.streamed_training.to_dict(), "plain": estimate.plain_training.to_dict()}
    if schedule == "plain":  # the plain step, and the model's plain prediction
        step_model, predicted = net, estimate.plain_training.total
    else:
        step_model, predicted = smodel, estimate.streamed_training.total
    net.zero_grad(set_to_none=True)
    resident = [*net.parameters(), *net.buffers(), x]

    def step():
        _loss(step_model(x), loss_kind).backward()

    owners: list = []
    with phase_marks(owners) if detail and schedule != "plain" else contextlib.nullcontext():
        truth = memtruth.measure(step, resident=resident)
    result = {
        "case": name,
        "schedule": schedule,
        "measured": truth.total,
        "predicted": predicted,
        "ratio": truth.total / predicted if predicted else None,
        "resident": truth.resident,
        "peak phase": truth.phase,
        "prediction": parts,
    }
    if detail:
        result["phases"] = {k: [v.start, v.peak] for k, v in truth.phases.items()}
        result["owners at marks"] = owners
        result["live at peak"] = truth.by_owner(classify)
    return result


def _mib(v) -> str:
    return "-" if v is None else f"{v / MIB:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--schedules", nargs="*", default=["carry", "recompute", "plain"])
    parser.add_argument("--detail", action="store_true", help="phases and owners")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for name in args.cases:
        for schedule in args.schedules:
            r = run_case(name, schedule, args.detail)
            results.append(r)
            ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
            print(
                f"{name:9s} {schedule:9s} measured {_mib(r['measured']):>6s} MiB  predicted {_mib(r['predicted']):>6s}"
                f" MiB  ratio {ratio}  (peak in {r['peak phase']})",
                flush=True,
            )
            if args.detail and schedule != "plain":
                print("  prediction:", json.dumps(r["prediction"]["streamed"]))
                held = {label: (store, pending) for label, store, pending in r["owners at marks"]}
                for label, (start, peak) in r["phases"].items():
                    store, pending = held.get(label, (None, None))
                    print(
                        f"    {label:22s} start {_mib(start):>6s}  peak {_mib(peak):>6s}"
                        f"  store {_mib(store):>5s}  pending {_mib(pending):>5s}"
                    )
                print("  live at peak (MiB):", {k: round(v / MIB, 1) for k, v in r["live at peak"].items()})
                marks = r["owners at marks"]
                big = max(marks, key=lambda m: m[1] + m[2]) if marks else None
                if big:
                    print(
                        f"  largest store + pending at a mark: {big[0]}: store {_mib(big[1])}, pending {_mib(big[2])}"
                    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
