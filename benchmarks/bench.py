"""One-command benchmark sweep: plain autograd, torch.utils.checkpoint, lightstream and
fxstream, side by side, each measurement in its own fresh process.

    python benchmarks/bench.py --device cpu      # ResNet-18/34, 512..2048 px, tile 1024
    python benchmarks/bench.py --device cuda     # ResNet-34, 2048..32768 px, fp32 + bf16, tile 2880
    python benchmarks/bench.py --device cpu --quick   # smoke test of the whole harness (small sizes)
    python benchmarks/bench.py --device cpu --threads 1 --reps 1   # on a loaded, shared machine

Per configuration (model, streamed part, precision) and image size, every method runs
one training step (forward + backward of a cross-entropy loss, batch 1) and records:

* time: the median over ``--reps`` steps after ``--warmup`` steps;
* peak memory. CUDA: ``torch.cuda.max_memory_allocated()`` over the steps (absolute:
  model, gradients and image included). CPU: the peak resident set size (VmHWM) of the
  process minus its RSS after building the model and the input (where the peak is reset
  through /proc/self/clear_refs), in a separate
  one-step process run with ``MALLOC_MMAP_THRESHOLD_=262144`` so that freed tensors leave
  the RSS (see examples/demo.py); the time comes from a run with default malloc settings;
* max relative error (``max|a-b| / max|b|``) of the output and of every parameter
  gradient against plain autograd on the same input (plain saves its output and gradients
  to a temporary file after its own measurement; the others load them after theirs), with
  the worst per group: conv weights, BatchNorm affine, linear head. On CUDA the errors
  come from a separate fp32 run with TF32 off at ``--error-size``, as timing runs use the
  default TF32 convolutions, against plain autograd in float64 and in fp32 (``--error-ref``:
  fp32 rounding of the reference itself reaches 1e-3 on large images);
* fxstream: tiles, halo overhead h (``ShapePlan.halo_overhead``) and the floor
  (1 + 3h)/3 x plain time (one extra no-grad forward plus the halo recomputation);
* lightstream: its forward/backward tile counts; runs needing more than ``--max-tiles``
  backward tiles are skipped with the reason.

Threads: torch's default on CPU. On a machine shared with other jobs, ``--threads 1``
avoids OpenMP contention (two threads under load ran a step 5x slower than one).

Output: a table printed and appended to BENCHMARKS.md (``--no-append`` to skip), a JSON
file and a log-log PNG plot (time and peak memory against image size, one line per
method; skipped with a message when matplotlib is missing) in ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)}  # CPU memory runs only (see examples/demo.py)
ORDER = ("plain", "checkpoint", "lightstream", "fxstream-recompute", "fxstream", "fxstream-host")
# fxstream-host: fxstream with the image left in host memory (tiles copied to the GPU one
# at a time); CUDA only, and in the default CUDA method list.


# --- Configurations -----------------------------------------------------------------------


def configs(args) -> list[dict]:
    """(arch, streamed part, precision) combinations of the sweep. The high-resolution
    prefix (conv1..layer2 streamed) is a CPU configuration of ResNet-18 (the issue's target)."""
    cpu = args.device == "cpu"
    archs = args.arch or (["resnet18", "resnet34"] if cpu else ["resnet34"])
    precisions = args.precision or (["fp32"] if cpu else ["fp32", "bf16"])
    out = []
    for arch in archs:
        for precision in precisions:
            out.append({"arch": arch, "upto": "layer4", "precision": precision})
            if cpu and arch == "resnet18" and not args.full_trunk_only:
                out.append({"arch": arch, "upto": "layer2", "precision": precision})
    return out


DEFAULTS = {
    # Tile per architecture. ResNet-34's receptive field is 899 px: at tile 1024 fxstream's
    # block is 4 output pixels (h = 42 at 2048 px), so the CPU sweep streams it at 2048.
    "cpu": {
        "sizes": [512, 1024, 2048],
        "tile": {"resnet18": 1024, "resnet34": 2048},
        "reps": 3,
        "error_size": None,
        "max_tiles": 100,
        "error_ref": "fp32",
    },
    "cuda": {
        "sizes": [2048, 4096, 8192, 16384, 32768],
        "tile": {"resnet18": 2880, "resnet34": 2880},
        "reps": 3,
        "error_size": 4096,
        "max_tiles": 1000,
        "error_ref": "float64",
    },
    "quick": {
        "sizes": [256, 512],
        "tile": {"resnet18": 640, "resnet34": 1024},
        "reps": 1,
        "error_size": None,
        "max_tiles": 100,
        "error_ref": "fp32",
    },
}


# --- Child process: one method, one size ----------------------------------------------------


def child(spec: dict) -> dict:
    """Build, run and measure one method in this (fresh) process."""
    import methods
    import models
    import torch

    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.backends.cudnn.benchmark = spec["cudnn_benchmark"]
    if spec["tf32_off"]:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    size = spec["size"]
    dtype = torch.float64 if spec.get("float64") else torch.float32
    net = models.build(spec["arch"], device, dtype)
    setting = methods.Setting(
        upto=spec["upto"],
        tile=spec["tile"],
        size=(size, size),
        device=device,
        autocast=torch.bfloat16 if spec["precision"] == "bf16" else None,
        segments=spec["segments"],
    )
    prepared = methods.METHODS[spec["method"]](net, setting)
    tiles = prepared.info.get("backward_tiles", 0)
    if tiles > spec["max_tiles"]:
        margin = prepared.info["gradient_margin"]
        return {
            "status": f"skipped: {tiles} backward tiles (gradient margin {margin[0]} px per side at tile "
            f"{spec['tile']}; limit --max-tiles {spec['max_tiles']})",
            "info": prepared.info,
        }
    x_device = "cpu" if spec["method"] == "fxstream-host" else device
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(x_device, dtype)
    target = torch.tensor([7], device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    baseline = _memory_now(device)
    times = []
    for i in range(spec["warmup"] + spec["reps"]):
        start = time.perf_counter()
        out = prepared.step(x, target)
        sync()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
    peak = _peak_memory(device)
    result = {
        "time_s": statistics.median(times) if times else None,
        "times_s": times,
        "peak_bytes": peak - (baseline if device == "cpu" else 0),
        "baseline_bytes": baseline,
        "info": prepared.info,
    }
    save, compare = spec.get("save"), dict(spec.get("compare") or {})
    if spec.get("ref"):  # sweep runs: plain writes the reference, the others compare with it
        if spec["method"] == "plain":
            save = spec["ref"]
        else:
            compare = {"plain fp32": spec["ref"]}
    grads = {n: p.grad for n, p in prepared.module.named_parameters() if p.grad is not None}
    by_ref = {
        label: _errors(torch.load(path), out, grads, prepared.module)
        for label, path in compare.items()
        if os.path.exists(path)
    }
    if by_ref:
        result["errors"] = next(iter(by_ref.values()))  # the first reference given
        result["errors_by_reference"] = by_ref
    if save:
        torch.save({"output": out.cpu(), "grads": {n: g.cpu() for n, g in grads.items()}}, save)
    return result


def _memory_now(device: str) -> int:
    """Reset the peak counter and return the baseline. CUDA: 0 (the peak is reported
    absolute). CPU: the RSS now, after resetting the peak RSS to it (``5`` written to
    /proc/self/clear_refs), so that a construction step that peaked higher (lightstream's
    statistics pass, fxstream's planning) does not hide the training step's peak; where
    the reset is not possible, the peak RSS so far."""
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return 0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return _vm_hwm()
    return _vm_hwm()  # equal to the current RSS right after the reset


def _peak_memory(device: str) -> int:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return _vm_hwm()


def _vm_hwm() -> int:
    """Peak resident set size of this process in bytes (VmHWM, Linux; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024


def _errors(ref: dict, out, grads: dict, module) -> dict:
    """Max relative errors against the plain-autograd reference: output, all parameter
    gradients, and the worst per group."""
    from torch import nn

    def rel(a, b):
        a, b = a.detach().double().cpu(), b.double()
        return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()

    kinds = {}
    for name, mod in module.named_modules():
        kind = "conv" if isinstance(mod, nn.modules.conv._ConvNd) else None
        kind = "bn" if isinstance(mod, nn.modules.batchnorm._BatchNorm) else kind
        kind = "fc" if isinstance(mod, nn.Linear) else kind
        for pname, _ in mod.named_parameters(recurse=False):
            kinds[f"{name}.{pname}" if name else pname] = kind or "other"
    errors = {"output": rel(out, ref["output"])}
    missing = sorted(set(ref["grads"]) - set(grads))
    per_param = {n: rel(grads[n], g) for n, g in ref["grads"].items() if n in grads}
    errors["params"] = max(per_param.values())
    errors["worst_param"] = max(per_param, key=per_param.get)
    for kind in ("conv", "bn", "fc"):
        values = [e for n, e in per_param.items() if kinds.get(n) == kind]
        if values:
            errors[kind] = max(values)
    if missing:
        errors["missing_grads"] = missing
    return errors


# --- Driver ---------------------------------------------------------------------------------


def run_child(spec: dict, env: dict, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    try:
        proc = subprocess.run(
            command, capture_output=True, text=True, env={**os.environ, **env}, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        message = next((line for line in reversed(tail) if "Error" in line), tail[-1] if tail else "")
        status = "OOM" if "out of memory" in (proc.stderr or "").lower() else f"failed: {message[:200]}"
        return {"status": status}
    return {"status": "ok", **json.loads(lines[-1][len("RESULT ") :])}


def measure(spec: dict, args, progress: str) -> dict:
    """One method at one size: timing run (+ errors), and on CPU the memory run."""
    start = time.perf_counter()
    result = run_child(spec, {}, args.timeout)
    if args.device == "cpu" and result["status"] == "ok":
        memory = run_child({**spec, "warmup": 0, "reps": 1, "ref": None}, MALLOC_ENV, args.timeout)
        result["peak_bytes"] = memory.get("peak_bytes")
        result["memory_status"] = memory["status"]
    row = {**{k: spec[k] for k in ("method", "arch", "upto", "precision", "size", "tile")}, **result}
    print(f"{progress} {describe(row)}  [{time.perf_counter() - start:.0f} s]", flush=True)
    return row


def describe(row: dict) -> str:
    head = f"{row['arch']}/{row['upto']}/{row['precision']} {row['size']:>5d} px {row['method']:<11s}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    text = f"{head} {row['time_s']:8.3f} s/step"
    if row.get("peak_bytes") is not None:
        text += f"  peak {row['peak_bytes'] / 2**30:7.3f} GiB"
    info = row.get("info", {})
    if "h" in info:
        text += f"  tiles {info['tiles']} h={info['h']:.2f}"
    if "errors" in row:
        text += f"  err params {row['errors']['params']:.1e}"
    return text


def sweep(args, meta: dict) -> dict:
    tmp = tempfile.mkdtemp(prefix="fxstream-bench-")
    rows: list = []
    jobs = [(c, s, m) for c in configs(args) for s in args.sizes for m in args.methods]
    try:
        _run_jobs(args, jobs, tmp, rows)
    except KeyboardInterrupt:  # Ctrl-C / SIGINT: keep and write what was measured
        meta["interrupted"] = f"after {len(rows)} of {len(jobs)} measurements"
        print(f"interrupted: writing the {len(rows)} measurements done", flush=True)
        return {"meta": meta, "rows": rows, "error_rows": []}
    error_rows = error_phase(args, tmp) if args.error_size else []
    return {"meta": meta, "rows": rows, "error_rows": error_rows}


def _run_jobs(args, jobs: list, tmp: str, rows: list) -> None:
    plain_done = {}  # (arch, precision, size) -> row: plain autograd does not depend on upto
    for i, (c, size, method) in enumerate(jobs, 1):
        progress = f"[{i}/{len(jobs)}]"
        key = (c["arch"], c["precision"], size)
        ref = os.path.join(tmp, f"ref-{c['arch']}-{c['precision']}-{size}.pt")
        if method == "plain" and key in plain_done:
            rows.append({**plain_done[key], "upto": c["upto"]})
            print(f"{progress} {describe(rows[-1])}  (same run as above)", flush=True)
            continue
        spec = {
            "method": method,
            **c,
            "size": size,
            "tile": args.tile[c["arch"]],
            "device": args.device,
            "warmup": args.warmup,
            "reps": args.reps,
            "segments": args.segments,
            "max_tiles": args.max_tiles,
            "threads": args.threads,
            "cudnn_benchmark": args.cudnn_benchmark,
            "tf32_off": False,
            "ref": ref if args.error_size is None else None,
        }
        row = measure(spec, args, progress)
        rows.append(row)
        if method == "plain":
            plain_done[key] = row


def error_phase(args, tmp: str) -> list[dict]:
    """fp32, TF32 off, one step per method at --error-size: the errors against plain
    autograd in fp32 and, with ``--error-ref float64``, first against plain autograd in
    float64 (plain fp32 then gets a row too: the rounding error of the fp32 reference)."""
    out = []
    for c in configs(args):
        if c["precision"] != "fp32":
            continue
        ref32, ref64 = (os.path.join(tmp, f"err-{c['arch']}-{c['upto']}-{d}.pt") for d in ("fp32", "fp64"))
        refs = {"plain float64": ref64} if args.error_ref == "float64" else {}
        runs = [("plain", True, ref64, {})] if refs else []
        for m in args.methods:
            runs.append(
                (m, False, ref32 if m == "plain" else None, refs if m == "plain" else {**refs, "plain fp32": ref32})
            )
        for method, float64, save, compare in runs:
            spec = {
                "method": method,
                **c,
                "size": args.error_size,
                "tile": args.tile[c["arch"]],
                "device": args.device,
                "warmup": 0,
                "reps": 1,
                "segments": args.segments,
                "max_tiles": args.max_tiles,
                "threads": args.threads,
                "cudnn_benchmark": False,
                "tf32_off": True,
                "float64": float64,
                "save": save,
                "compare": compare,
            }
            result = run_child(spec, {}, args.timeout)
            row = {**{k: spec[k] for k in ("method", "arch", "upto", "precision", "size", "tile")}, **result}
            row["reference"] = next(iter(compare), "")
            if float64:
                row["precision"] = "float64"
            print(f"[errors, TF32 off] {describe(row)}", flush=True)
            out.append(row)
    return out


def metadata(args) -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/bench.py " + " ".join(sys.argv[1:]),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": args.threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu,
        "tile": ", ".join(f"{a} {t}" for a, t in args.tile.items()),
        "warmup": args.warmup,
        "reps": args.reps,
        "segments": args.segments,
        "cudnn_benchmark": args.cudnn_benchmark,
        "load_before": _load(),
        "fxstream_source": _git_state(),
    }
    try:
        from importlib.metadata import version

        import lightstream  # noqa: F401

        meta["lightstream"] = version("lightstream")
    except Exception as exc:  # noqa: BLE001 (record why it is missing)
        meta["lightstream"] = f"unavailable: {exc}"
    return meta


def _git_state() -> str:
    """The commit the run measured, and whether fxstream/ had uncommitted changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "fxstream"], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        return "unknown"
    state = head.stdout.strip() or "unknown"
    return state + (" + uncommitted changes in fxstream/" if dirty.stdout.strip() else "")


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


# --- Derived figures, table, targets ----------------------------------------------------------


def annotate(result: dict) -> None:
    """Ratios against plain autograd (same config and size) and fxstream's floor."""
    rows = result["rows"]
    plain = {(r["arch"], r["upto"], r["precision"], r["size"]): r for r in rows if r["method"] == "plain"}
    for r in rows:
        p = plain.get((r["arch"], r["upto"], r["precision"], r["size"]))
        ok = r["status"] == "ok" and p is not None and p["status"] == "ok"
        if ok:
            r["time_x_plain"] = r["time_s"] / p["time_s"]
            if r.get("peak_bytes") and p.get("peak_bytes"):
                r["mem_x_plain"] = r["peak_bytes"] / p["peak_bytes"]
            if "floor_ratio" in r.get("info", {}):
                r["floor_s"] = r["info"]["floor_ratio"] * p["time_s"]
                r["time_x_floor"] = r["time_s"] / r["floor_s"]


def _gib(b) -> str:
    return "" if b is None else f"{b / 2**30:.3f}"


TILED_METHODS = ("fxstream", "fxstream-recompute", "fxstream-host", "lightstream")


def table(result: dict) -> str:
    lines = [
        "| config | image | method | time / step | x plain | peak memory (GiB) | x plain | tiles | h "
        "| FLOP floor (schedule) | time / floor | max rel err output | params | conv w | BN affine |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cfg = f"{r['arch']} {'trunk' if r['upto'] == 'layer4' else 'to ' + r['upto']} {r['precision']}"
        image = f"{r['size']}x{r['size']}"
        if r["status"] != "ok":
            lines.append(f"| {cfg} | {image} | {r['method']} | {r['status']} |" + " |" * 11)
            continue
        info, err = r.get("info", {}), r.get("errors") or {}
        fx = "h" in info
        cells = [
            cfg,
            image,
            r["method"] + (f", tile {r['tile']}" if r["method"] in TILED_METHODS else ""),
            f"{r['time_s']:.3f} s",
            f"{r['time_x_plain']:.2f}x" if "time_x_plain" in r else "",
            _gib(r.get("peak_bytes")),
            f"{r['mem_x_plain']:.2f}x" if "mem_x_plain" in r else "",
            str(info["tiles"]) if fx else "",
            f"{info['h']:.2f}" if fx else "",
            f"{r['floor_s']:.3f} s ({info['floor_ratio']:.2f}x)" if "floor_s" in r else "",
            f"{r['time_x_floor']:.2f}x" if "time_x_floor" in r else "",
        ]
        cells += [f"{err[k]:.1e}" if k in err else "" for k in ("output", "params", "conv", "bn")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def error_table(rows: list[dict]) -> str:
    lines = [
        "| config | image | method | reference | output | all params | conv w | BN affine | worst parameter "
        "| all params vs plain fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cfg = f"{r['arch']} {'trunk' if r['upto'] == 'layer4' else 'to ' + r['upto']}"
        head = f"| {cfg} | {r['size']}x{r['size']} | {r['method']} | {r.get('reference', '')} |"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']} | | | | | |")
        elif "errors" not in r:
            lines.append(f"{head} (reference, {r['precision']}) | | | | | |")
        else:
            e = r["errors"]
            cells = [f"{e[k]:.1e}" if k in e else "" for k in ("output", "params", "conv", "bn")]
            vs32 = r.get("errors_by_reference", {}).get("plain fp32", {}).get("params")
            extra = f"{vs32:.1e}" if vs32 is not None and r.get("reference") != "plain fp32" else ""
            lines.append(f"{head} {' | '.join(cells)} | {e['worst_param']} | {extra} |")
    return "\n".join(lines)


def targets(result: dict) -> list[str]:
    """The issue's targets that this run can decide: met / missed (figures) / not measured."""
    rows = [r for r in result["rows"] if r["status"] == "ok"]

    def find(method, arch, upto, size, precision="fp32"):
        return next(
            (
                r
                for r in rows
                if (r["method"], r["arch"], r["upto"], r["size"], r["precision"])
                == (method, arch, upto, size, precision)
            ),
            None,
        )

    out = []
    if result["meta"]["device"] == "cpu":
        fx = find("fxstream", "resnet18", "layer2", 2048)
        if fx and "time_x_plain" in fx and "mem_x_plain" in fx and fx["tile"] == 1024:
            t, m = fx["time_x_plain"], fx["mem_x_plain"]
            verdict = "met" if t <= 1.6 and m <= 0.4 else "missed"
            out.append(
                f"CPU ResNet-18 prefix (to layer2), 2048 px, tile 1024: time {t:.2f}x plain (target <= 1.6x), "
                f"peak RSS {m:.2f}x plain (target <= 0.4x): {verdict}"
            )
        else:
            out.append("CPU ResNet-18 prefix, 2048 px, tile 1024: not measured")
        fx = find("fxstream", "resnet18", "layer4", 2048)
        if fx and "time_x_floor" in fx and fx["tile"] == 1024:
            v = fx["time_x_floor"]
            out.append(
                f"CPU ResNet-18 full trunk, 2048 px, tile 1024: time {v:.2f}x the floor (target <= 1.25x): "
                f"{'met' if v <= 1.25 else 'missed'}"
            )
        else:
            out.append("CPU ResNet-18 full trunk, 2048 px, tile 1024: not measured")
        return out
    fx, ls = find("fxstream", "resnet34", "layer4", 8192), find("lightstream", "resnet34", "layer4", 8192)
    if fx and ls and "time_x_floor" in fx and fx["tile"] == 2880:
        ok = fx["time_s"] <= 0.5 * ls["time_s"] and fx["time_x_floor"] <= 1.25 and fx["peak_bytes"] <= ls["peak_bytes"]
        out.append(
            f"GPU ResNet-34 8192 px tile 2880: fxstream {fx['time_s']:.3f} s = {fx['time_s'] / ls['time_s']:.2f}x "
            f"lightstream (<= 0.5x), {fx['time_x_floor']:.2f}x floor (<= 1.25x), peak "
            f"{_gib(fx['peak_bytes'])} GiB vs lightstream {_gib(ls['peak_bytes'])} GiB: {'met' if ok else 'missed'}"
        )
    else:
        out.append("GPU ResNet-34 8192 px vs lightstream and floor: not measured")
    host = find("fxstream-host", "resnet34", "layer4", 32768)
    big = host or find("fxstream", "resnet34", "layer4", 32768)
    ref = find(big["method"], "resnet34", "layer4", 8192) if big else None
    if big:
        per_mp = (big["time_s"] / 32768**2) / (ref["time_s"] / 8192**2) if ref else float("nan")
        ok = big["time_s"] <= 10 and big["peak_bytes"] <= 8 * 2**30 and per_mp <= 1.2
        where = "image in host memory" if host else "image on the GPU (host-memory variant not measured)"
        out.append(
            f"GPU 32768 px ({big['method']}, {where}): {big['time_s']:.2f} s (<= 10 s), "
            f"{_gib(big['peak_bytes'])} GiB (<= 8 GiB), time per megapixel {per_mp:.2f}x that at 8192 px "
            f"(<= 1.2x): {'met' if ok and host else 'missed' if not ok else 'not decided (image on the GPU)'}"
        )
    else:
        out.append("GPU 32768 px: not measured")
    errs = [r for r in result.get("error_rows", []) if r["method"] == "fxstream" and "errors" in r]
    if errs:
        by_ref = errs[0]["errors_by_reference"]
        e32 = by_ref.get("plain fp32", {}).get("params")
        e64 = by_ref.get("plain float64", {}).get("params")
        text = f"gradient error at {errs[0]['size']} px, TF32 off: fxstream vs plain fp32 {e32:.1e} (<= 1e-5): "
        text += "met" if e32 <= 1e-5 else "missed"
        if e64 is not None:
            text += f"; against plain float64: fxstream {e64:.1e}"
            plain = next((r for r in result["error_rows"] if r["method"] == "plain" and "errors" in r), None)
            if plain:
                text += f", plain fp32 itself {plain['errors']['params']:.1e}"
        out.append(text)
    else:
        out.append("gradient error, TF32 off: not measured")
    out.append("GPU 8192 px under a 16 GiB budget with tile and boundary chosen by fxstream: not measured here")
    return out


def write(result: dict, args) -> None:
    meta = result["meta"]
    meta["load_after"] = _load()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M}-{args.device}{'-quick' if args.quick else ''}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(result, indent=1))
    import plot

    png_path = out_dir / f"{stem}.png"
    plotted = plot.plot(result, png_path)
    report = section(result, json_path, png_path if plotted else None)
    print("\n" + report)
    if not args.no_append:
        with open(ROOT / "BENCHMARKS.md", "a") as f:
            f.write("\n" + report)
        print(f"appended to {ROOT / 'BENCHMARKS.md'}")
    print(f"wrote {json_path}" + (f" and {png_path}" if plotted else ""))


def section(result: dict, json_path: Path, png_path: Path | None) -> str:
    m = result["meta"]
    rel = lambda p: os.path.relpath(p, ROOT)
    lines = [
        f"## {m['date']}: sweep on {m['device']}{' (quick smoke run)' if 'quick' in m['command'] else ''}",
        "",
        f"`{m['command']}`",
        "",
        *([f"**Interrupted {m['interrupted']}.**", ""] if m.get("interrupted") else []),
        f"- Machine: {m['device_name'] + '; host ' if m['device'] == 'cuda' else ''}{m['cpu']}, "
        f"{m['cores']} CPU cores, "
        f"torch {m['torch_threads']} thread(s); "
        f"torch {m['torch']}; lightstream {m['lightstream']}; fxstream at {m['fxstream_source']}.",
        f"- Load average (1/5/15 min) before: {m['load_before']}, after: {m['load_after']}"
        + (" (shared, loaded machine: timings are noisy)" if _loaded(m) else "")
        + ".",
        f"- Settings: tile {m['tile']}; {m['warmup']} warm-up step(s), median of {m['reps']}; checkpoint_sequential "
        f"with {m['segments']} segments over the ResNet blocks; cudnn.benchmark {m['cudnn_benchmark']}; "
        + ("fp32 with the default TF32 settings, bf16 = autocast forward." if m["device"] == "cuda" else "fp32."),
        "- Memory: "
        + (
            "`torch.cuda.max_memory_allocated()` over the steps (model, gradients and image included)."
            if m["device"] == "cuda"
            else "peak RSS (VmHWM) of a fresh one-step process minus its RSS after building the model and "
            "the input (the peak reset there through /proc/self/clear_refs), with "
            "`MALLOC_MMAP_THRESHOLD_=262144`; times from a separate run with default malloc."
        ),
        "- Errors: max |a-b|/max|b| against plain autograd on the same input: output, all parameter gradients, "
        "worst conv weight, worst BatchNorm affine"
        + (" (separate fp32 run, TF32 off)." if result.get("error_rows") else "."),
        f"- Raw results: `{rel(json_path)}`" + (f"; plot: `{rel(png_path)}`" if png_path else "") + ".",
        "",
        table(result),
        "",
    ]
    if png_path:
        lines += [f"![time and peak memory against image size]({rel(png_path)})", ""]
    if result.get("error_rows"):
        lines += ["Error run (fp32, TF32 off, one step):", "", error_table(result["error_rows"]), ""]
    lines += ["Targets:", ""] + [f"- {t}" for t in targets(result)] + [""]
    return "\n".join(lines)


def _loaded(meta: dict) -> bool:
    try:
        loads = [float(meta["load_before"].split()[0]), float(meta["load_after"].split()[0])]
    except (ValueError, IndexError):
        return False
    return max(loads) > 0.5 * (meta["cores"] or 1)


# --- Entry point ------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes and tile, 1 rep: checks the harness")
    parser.add_argument("--sizes", type=int, nargs="+", help="square image edges (default per device)")
    parser.add_argument(
        "--tile",
        type=int,
        help="tile edge for lightstream and fxstream (default CPU: ResNet-18 1024, ResNet-34 2048; CUDA 2880)",
    )
    parser.add_argument("--reps", type=int, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--methods", nargs="+", choices=ORDER, help="default: all (fxstream-host on CUDA only)")
    parser.add_argument("--arch", nargs="+", choices=["resnet18", "resnet34"])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"])
    parser.add_argument("--full-trunk-only", action="store_true", help="skip the prefix configuration")
    parser.add_argument("--segments", type=int, default=8, help="checkpoint_sequential segments")
    parser.add_argument(
        "--max-tiles", type=int, help="skip lightstream beyond this many backward tiles (default CPU 100, CUDA 1000)"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads per process (default: torch's; 1 on a loaded shared machine)"
    )
    parser.add_argument("--cudnn-benchmark", action="store_true")
    parser.add_argument("--error-size", type=int, help="separate TF32-off error run at this size (CUDA default 4096)")
    parser.add_argument("--no-error-run", action="store_true", help="CUDA: skip the separate error run")
    parser.add_argument(
        "--error-ref",
        choices=["fp32", "float64"],
        help="error run reference: plain autograd in fp32, or float64 and fp32 (default CUDA float64)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    parser.add_argument("--no-append", action="store_true", help="do not append the table to BENCHMARKS.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = DEFAULTS["quick" if args.quick else args.device]
    for key in ("sizes", "tile", "reps", "error_size", "max_tiles", "error_ref"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    if isinstance(args.tile, int):
        args.tile = dict.fromkeys(("resnet18", "resnet34"), args.tile)
    if args.no_error_run:
        args.error_size = None
    methods = args.methods or [m for m in ORDER if args.device == "cuda" or m != "fxstream-host"]
    args.methods = [m for m in ORDER if m in methods]  # plain first: it writes the reference
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))), flush=True)
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible")
    result_meta = metadata(args)
    print(
        f"{result_meta['device_name']}, torch {result_meta['torch']}, lightstream {result_meta['lightstream']}, "
        f"load {result_meta['load_before']}",
        flush=True,
    )
    result = sweep(args, result_meta)
    annotate(result)
    write(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
