"""``fxstream plan``: inspect a streaming plan before anything runs.

    fxstream plan MODEL --input-shape 1,3,8192,8192 --tile-size 1024 [--boundary NODE[,NODE...]]
                  [--dtype float32] [--format text|json|dot|code] [--png FILE]
                  [--memory-budget 8GiB] [--train] [--schedule carry|recompute]
                  [--stripes auto|device|host|banded] [--band-rows N]
                  [--device cuda|cpu] [--output-device cpu]

MODEL is ``package.module:callable`` (keyword arguments in parentheses, as Python
literals: ``'torchvision.models:resnet34(num_classes=10)'``), ``path/to/file.py:callable``,
or a bare torchvision model name (``resnet34``). A callable that takes ``weights`` gets
``weights=None`` unless given: nothing is downloaded. The model is put in eval mode
(``--train`` keeps training mode). ``--tile-size auto`` and ``--boundary auto`` choose them
for ``--memory-budget`` (see ``fxstream.memory.auto``), and with the default ``--stripes auto``
also where the carry schedule keeps its stripes.

The memory is predicted for a compute device of type ``--device``: ``cuda`` (an accelerator,
the default; the input is host-resident and the report splits the peak into device and host
bytes) or ``cpu`` (one memory). ``--output-device cpu`` assembles the trunk output, and runs
what reads it, in host memory (``compile(output_device="cpu")``).

Only shapes are used: the plan and tiling come from sizes, per-node channel counts from
one run of the trunk on a tiny input. Bad input (including a malformed command line) prints
one line to stderr, exit status 2. ``--png FILE`` writes exactly FILE (no extension is
added); a directory or an unwritable path is an error.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib
import importlib.util
import inspect
import io
import json
import os
import sys

import torch
import torch.nn as nn

from ..distributed import split_lines, split_report
from ..errors import ArgumentError, FxStreamError
from ..memory.auto import choose
from ..memory.units import parse_bytes
from ..module import compile as fx_compile
from ..planning.schedule import PLACEMENTS, Schedule
from . import render, report

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


class UsageError(ArgumentError):
    """Bad command-line input: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors printed as one line (exit status 2) like every other."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "plan":
        parser.print_help()
        return 2
    try:
        return plan_command(args)
    except (FxStreamError, ValueError, ImportError) as exc:
        message = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"fxstream plan: error: {message}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxstream", description="fxstream command-line tools")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    plan = sub.add_parser(
        "plan",
        help="show the streaming plan, tiling and predicted memory of a model",
        description="Show the streaming plan of MODEL for one input shape: per trunk node its stride, "
        "receptive field, halo, interior-tile region and activation bytes; the tiling; and the "
        "predicted peak memory, streamed and plain. Nothing full-size is allocated.",
    )
    plan.add_argument(
        "model",
        metavar="MODEL",
        help="pkg.module:callable[(kwargs)], path/file.py:callable, or a torchvision model name",
    )
    plan.add_argument("--input-shape", required=True, metavar="N,C,H,W", help="input shape, e.g. 1,3,8192,8192")
    plan.add_argument(
        "--tile-size",
        required=True,
        metavar="T",
        help="tile edge in pixels (halo included): T, T1,T2 per spatial dim, or 'auto' (needs --memory-budget)",
    )
    plan.add_argument(
        "--boundary",
        metavar="NODE",
        help="node or module path of the last streamed op, several separated by commas (one per trunk output), "
        "or 'auto'",
    )
    plan.add_argument(
        "--schedule", choices=["carry", "recompute"], default=None, help="how the tiles run (default: carry)"
    )
    plan.add_argument(
        "--stripes",
        choices=list(PLACEMENTS),
        default="auto",
        help="where carry keeps its stripes: auto (host on an accelerator, device on a CPU; with --tile-size auto, "
        "what the budget needs), device, host or banded",
    )
    plan.add_argument("--band-rows", type=int, metavar="N", help="--stripes banded: tile rows per band (default 4)")
    plan.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="the compute device the memory is predicted for (default cuda: an accelerator, input on the host)",
    )
    plan.add_argument(
        "--output-device",
        metavar="DEVICE",
        help="where the trunk output and its gradient are assembled, e.g. cpu (default: the compute device)",
    )
    plan.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the memory prediction")
    plan.add_argument("--format", default="text", choices=("text", "json", "dot", "code"), help="output format")
    plan.add_argument("--png", metavar="FILE", help="also draw the tile grid into FILE (needs matplotlib)")
    plan.add_argument(
        "--memory-budget",
        metavar="BYTES",
        help="e.g. 8GiB: check the prediction against it, or choose --tile-size/--boundary auto within it",
    )
    plan.add_argument("--train", action="store_true", help="keep the model in training mode (default: eval)")
    plan.add_argument(
        "--ranks", type=int, default=1, metavar="N", help="show the tile-parallel split over N ranks (tile_group)"
    )
    return parser


def plan_command(args: argparse.Namespace) -> int:
    input_shape = parse_shape(args.input_shape)
    tile_size = parse_tile(args.tile_size)
    if args.png:
        _check_writable(args.png)
    dtype = DTYPES[args.dtype]
    budget = _budget(args.memory_budget) if args.memory_budget else None
    model = load_model(args.model)
    model.train(args.train)
    boundary = args.boundary
    if boundary is not None and "," in boundary:
        boundary = [part.strip() for part in boundary.split(",")]
    reason = ""
    schedule = _schedule(args)
    if tile_size == "auto" or boundary == "auto":
        if budget is None:
            raise UsageError("--tile-size auto and --boundary auto need --memory-budget (e.g. 8GiB)")
        choice = choose(
            model, tile_size, boundary, budget, input_shape, dtype, schedule, args.device, args.output_device
        )
        tile_size, boundary, reason, schedule = choice.tile_size, choice.boundary, choice.reason, choice.schedule
    smodel = fx_compile(model, tile_size, boundary=boundary, schedule=schedule, output_device=args.output_device)
    program = smodel.program()
    if len(input_shape) - 2 != program.geometry.ndim:
        raise UsageError(
            f"--input-shape {args.input_shape} has {len(input_shape) - 2} spatial dims, the trunk has "
            f"{program.geometry.ndim} (give N,C and one size per spatial dim)"
        )
    data = report.build(smodel, input_shape, dtype, model_name=args.model, budget=budget, device=args.device)
    data["choice"] = reason or None
    if args.ranks < 1:
        raise UsageError(f"--ranks must be >= 1, got {args.ranks}")
    if args.ranks > 1:
        data["split"] = split_report(smodel, input_shape, args.ranks, data, dtype)
    if args.png:
        shape = smodel.shape_plan(*input_shape[2:])
        image = io.BytesIO()
        render.png(shape, program.plan, image, title=args.model)
        _write(args.png, image.getvalue())
    sys.stdout.write(_render(args.format, data, smodel, reason))
    return 0


def _render(fmt: str, data: dict, smodel, reason: str) -> str:
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    if fmt == "code":
        return smodel.streamed_trunk.tile.code.strip("\n") + "\n"
    if fmt == "dot":
        program = smodel.program()
        trunk = {n.name for n in program.analysis.trunk}
        return render.dot(program.analysis.gm.graph, trunk, program.geometry.image, program.geometry.outputs)
    split = split_lines(data["split"]) if data.get("split") else []
    return (reason + "\n\n" if reason else "") + "\n".join([render.text(data), *split]) + "\n"


def _schedule(args: argparse.Namespace) -> Schedule | str | None:
    """The schedule that ``--schedule``, ``--stripes`` and ``--band-rows`` name."""
    if args.stripes == "auto" and args.band_rows is None:
        return args.schedule  # None: the default schedule
    if args.schedule not in (None, "carry"):
        raise UsageError("--stripes and --band-rows are for the carry schedule; drop them or use --schedule carry")
    if args.band_rows is not None and args.stripes != "banded":
        raise UsageError("--band-rows is the band height of --stripes banded; add --stripes banded or drop it")
    return Schedule("carry", stripes=args.stripes, band_rows=args.band_rows)


def _budget(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise UsageError(f"--memory-budget: {exc}") from None


def _check_writable(path: str) -> None:
    """Fail before any work if ``--png`` cannot be written."""
    if os.path.isdir(path):
        raise UsageError(f"--png {path!r} is a directory; give a file name, e.g. {os.path.join(path, 'tiles.png')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"--png {path!r}: the folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise UsageError(f"--png {path!r}: permission denied")


def _write(path: str, data: bytes) -> None:
    try:
        with open(path, "wb") as file:
            file.write(data)
    except OSError as exc:
        raise UsageError(f"--png {path!r}: cannot write: {exc.strerror or exc}") from None


def parse_shape(text: str) -> tuple[int, ...]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) < 3 or min(shape) < 1:
        raise UsageError(
            f"--input-shape must be N,C and one size per spatial dim, positive ints (e.g. 1,3,8192,8192), got {text!r}"
        )
    return shape


def parse_tile(text: str) -> int | tuple[int, ...] | str:
    if text == "auto":
        return text
    try:
        values = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise UsageError(f"--tile-size must be a positive int, one per spatial dim, or 'auto', got {text!r}")
    return values[0] if len(values) == 1 else values


# --- model specs -------------------------------------------------------------------------


def load_model(spec: str) -> nn.Module:
    """Build the model that ``spec`` names (see the module docstring)."""
    target, kwargs = _split_kwargs(spec)
    if ":" not in target:
        return _torchvision_model(target, kwargs)
    where, _, name = target.rpartition(":")
    if not where or not name:
        raise UsageError(
            f"model spec {spec!r}: expected package.module:callable or path/file.py:callable, with both parts "
            f"non-empty (e.g. torchvision.models:resnet34), or a torchvision model name"
        )
    module = _load_file(where) if where.endswith(".py") or os.sep in where else _import(where)
    obj = module
    for atom in name.split("."):
        if not hasattr(obj, atom):
            raise UsageError(f"model spec {spec!r}: {where} has no attribute {name!r}")
        obj = getattr(obj, atom)
    return _build(obj, kwargs, spec)


def _split_kwargs(spec: str) -> tuple[str, dict]:
    """``'name(a=1, b="x")'`` -> ``('name', {'a': 1, 'b': 'x'})``: literals only."""
    spec = spec.strip()
    if not spec.endswith(")") or "(" not in spec:
        return spec, {}
    target = spec[: spec.index("(")]
    usage = "arguments must be keyword=literal pairs, e.g. resnet34(num_classes=10)"
    try:
        call = ast.parse(f"f{spec[spec.index('(') :]}", mode="eval").body
    except SyntaxError as exc:
        raise UsageError(f"model spec {spec!r}: {usage} ({exc.msg})") from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise UsageError(f"model spec {spec!r}: {usage}")
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise UsageError(
                f"model spec {spec!r}: {kw.arg}={ast.unparse(kw.value)} is not a Python literal; {usage}"
            ) from None
    return target, kwargs


def _import(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"cannot import module {name!r} for the model spec: {exc}") from None
    except SystemExit as exc:
        raise UsageError(f"importing module {name!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise UsageError(f"importing module {name!r} failed: {type(exc).__name__}: {exc}") from None


def _load_file(path: str):
    if not os.path.isfile(path):
        raise UsageError(f"model file {path!r} does not exist")
    name = "fxstream_user_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SystemExit as exc:
        raise UsageError(f"importing {path!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise UsageError(f"importing {path!r} failed: {type(exc).__name__}: {exc}") from None
    return module


def _torchvision_model(name: str, kwargs: dict) -> nn.Module:
    try:
        import torchvision.models as models
    except ImportError:
        raise UsageError(f"model {name!r} is not module:callable and torchvision is not installed") from None
    available = models.list_models(module=models)
    if name not in available:
        close = difflib.get_close_matches(name, available, n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UsageError(
            f"unknown model spec {name!r}: not package.module:callable, file.py:callable, or a torchvision "
            f"classification model name{hint}"
        )
    return _build(models.get_model_builder(name), kwargs, name)


def _build(obj, kwargs: dict, spec: str) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise UsageError(f"model spec {spec!r} names a {type(obj).__name__}, not a callable or nn.Module")
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    if "weights" in params and "weights" not in kwargs:
        kwargs = {**kwargs, "weights": None}  # never download
    try:
        model = obj(**kwargs)
    except SystemExit as exc:  # would end `fxstream plan` with the model's exit status, silently
        raise UsageError(f"building {spec!r} called sys.exit({exc.code!r})") from None
    except Exception as exc:
        raise UsageError(f"building {spec!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UsageError(f"model spec {spec!r} returned a {type(model).__name__}, not an nn.Module")
    return model
