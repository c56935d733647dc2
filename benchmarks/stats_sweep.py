"""The models an outside sweep of fxstream 0.1.0 rejected for a global-statistics op, with
statistics passes (issue 20): does each stream whole now, with how many levels, at what
predicted cost; and for a few cheap ones, the measured step ratio and float64 exactness.

Part 1, planning (shapes only, every model): ``fxstream.compile(model, tile_size=TILE)`` at
the default settings (``max_levels=4``, carry). Recorded: whether it compiles whole, the
levels, the statistics by category, and the plan report's ``predicted_step_ratio`` (the CLI's
``fxstream plan --format json`` on a CPU compute device) for an input of ``PLAN_SIDE`` px.
A refusal records the ``StatisticsError``'s ``levels``, ``predicted_step_ratio`` and
``boundary``, then compiles again with ``max_levels=None`` for the full plan. Any other error
is recorded as its class and first line. Nothing runs at full size.

Part 2, measured (a few cheap models that stream whole): the time of one training step
(forward, backward of ``out.sum()``) of the plain and the streamed model, float32, one
thread, a warm-up pair then ``REPEATS`` pairs back to back; the ratio is the median of the
pairs' ratios. Then float64 exactness (affine parameters and running statistics randomised):
the output, the input gradient and every parameter gradient against the plain model, max
relative error (a gradient that is zero by the math, e.g. a convolution bias before an
InstanceNorm, relative to the model's largest gradient, as tests/test_statistics.py).

Random weights everywhere (``pretrained=False``, ``weights=None``, ``encoder_weights=None``);
nothing is downloaded.

Usage (repository root): PYTHONPATH=. python benchmarks/stats_sweep.py [--plan-only|--measure-only]
[--models NAME ...]  -> benchmarks/results/stats_sweep.json (merged with an existing file).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import signal
import statistics as stats_
import time
import warnings
from collections import Counter

import torch
import torch.nn as nn

import fxstream
from fxstream.cli.report import build as plan_report

torch.set_num_threads(1)
warnings.filterwarnings("ignore")

TILE = 512  # compile's tile_size for planning
PLAN_SIDE = 2048  # the input side the predicted ratio is for
COMPILE_LIMIT_S = 240  # a model whose compile (or plan) takes longer is recorded as too slow
REPEATS = 2
RESULTS = os.path.join(os.path.dirname(__file__), "results", "stats_sweep.json")


# --- models --------------------------------------------------------------------------------------


def _smp(arch: str, encoder: str):
    def make():
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=2)

    return make


def _timm(name: str):
    def make():
        import timm

        return timm.create_model(name, pretrained=False)

    return make


def _monai(name: str):
    def make():
        from monai.networks import nets

        if name == "UNet":  # no defaults for channels/strides: MONAI's documented 2-D example
            return nets.UNet(2, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2)
        if name == "BasicUNet":
            return nets.BasicUNet(spatial_dims=2, in_channels=1, out_channels=2)
        if name == "DynUNet":
            k, s = [3] * 5, [1, 2, 2, 2, 2]
            return nets.DynUNet(
                2, 1, 2, kernel_size=k, strides=s, upsample_kernel_size=s[1:], filters=(16, 32, 64, 128, 256)
            )
        if name == "AttentionUnet":
            return nets.AttentionUnet(2, 1, 2, channels=(16, 32, 64, 128), strides=(2, 2, 2))
        if name == "SegResNet":
            return nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=2, init_filters=8)
        raise ValueError(name)

    return make


def _deeplabv3():
    import torchvision

    return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None)


# name -> (category, builder, input channels)
MODELS = {
    "timm efficientnet_b0": ("squeeze-excitation", _timm("efficientnet_b0"), 3),
    "timm mobilenetv3_small_100": ("squeeze-excitation", _timm("mobilenetv3_small_100"), 3),
    "timm regnety_002": ("squeeze-excitation", _timm("regnety_002"), 3),
    "timm nfnet_l0": ("squeeze-excitation", _timm("nfnet_l0"), 3),
    "smp Unet efficientnet-b0": ("squeeze-excitation", _smp("Unet", "efficientnet-b0"), 3),
    "MONAI UNet": ("GroupNorm/InstanceNorm", _monai("UNet"), 1),
    "MONAI BasicUNet": ("GroupNorm/InstanceNorm", _monai("BasicUNet"), 1),
    "MONAI DynUNet": ("GroupNorm/InstanceNorm", _monai("DynUNet"), 1),
    "MONAI AttentionUnet": ("GroupNorm/InstanceNorm", _monai("AttentionUnet"), 1),
    "MONAI SegResNet": ("GroupNorm/InstanceNorm", _monai("SegResNet"), 1),
    "smp FPN resnet18": ("GroupNorm/InstanceNorm", _smp("FPN", "resnet18"), 3),
    "timm poolformer_s12": ("GroupNorm/InstanceNorm", _timm("poolformer_s12"), 3),
    "timm convnextv2_atto": ("GRN", _timm("convnextv2_atto"), 3),
    "torchvision deeplabv3_resnet50": ("global pooling branch", _deeplabv3, 3),
    "smp DeepLabV3 resnet18": ("global pooling branch", _smp("DeepLabV3", "resnet18"), 3),
    "smp DeepLabV3Plus resnet18": ("global pooling branch", _smp("DeepLabV3Plus", "resnet18"), 3),
    "smp PSPNet resnet18": ("global pooling branch", _smp("PSPNet", "resnet18"), 3),
    "smp UPerNet resnet18": ("global pooling branch", _smp("UPerNet", "resnet18"), 3),
    "smp PAN resnet18": ("global pooling branch", _smp("PAN", "resnet18"), 3),
}
TRAIN = ["smp PSPNet resnet18", "smp FPN resnet18"]  # also planned in train mode (BatchNorm statistics)

# (model, train mode, float32 side, float32 tile, float64 side, float64 tile, max_levels)
MEASURE = [
    ("smp PSPNet resnet18", False, 512, 256, 256, 128, 4),
    ("smp FPN resnet18", False, 512, 320, 320, 288, 4),
    ("smp UPerNet resnet18", False, 512, 320, 384, 320, 4),
    ("MONAI BasicUNet", False, 256, 96, 128, 96, None),
    ("smp PSPNet resnet18", True, 256, 128, 256, 128, None),  # train-mode BatchNorm: 11 levels, batch 2
]


# --- part 1: planning ----------------------------------------------------------------------------


# a model streams whole when nothing follows its trunk but a classifier on globally pooled features
POOLS = {"AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "SelectAdaptivePool2d", "mean", "adaptive_avg_pool2d"}


class TooSlow(Exception):
    pass


def _alarm(signum, frame):
    raise TooSlow(f"more than {COMPILE_LIMIT_S} s")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def describe(smodel, shape) -> dict:
    """Levels, statistics by category and the predicted ratio of a compiled model."""
    report = plan_report(smodel, shape, device="cpu")
    st = report["statistics"]
    categories = Counter(s["category"] for level in st["per_level"] for s in level["statistics"])
    return {
        "boundary": report["boundary"],
        "levels": st["levels"],
        "passes": st["passes"],
        "statistics": dict(categories),
        "predicted_step_ratio": round(report["predicted_step_ratio"], 3),
        "num_tiles": report["num_tiles"],
        "halo_overhead": report["halo_overhead"],
        "receptive_field": report["receptive_field"],
    }


def head_ops(smodel) -> list[str]:
    """The ops after the trunk that compute on the image's values (not the trunk, the
    statistics or their heads): a classifier's pooling and linear layer; none for a model
    streamed to its last op."""
    a = smodel.program().analysis
    inside = set(a.trunk) | {s.node for s in a.statistics} | set(a.heads) | {v for v, _ in a.values}
    dependent, ops = {a.image}, []
    for n in a.gm.graph.nodes:
        if n is a.image or not any(i in dependent for i in n.all_input_nodes):
            continue
        dependent.add(n)
        if n in inside or n.op not in ("call_module", "call_function", "call_method"):
            continue
        if n.op != "call_module" and "tensor_shape" not in n.meta:  # shape arithmetic and guards
            continue
        if n.op == "call_module":
            ops.append(type(a.gm.get_submodule(n.target)).__name__)
        else:
            ops.append(getattr(n.target, "__name__", str(n.target)))
    return ops


def plan_one(name: str, train: bool) -> dict:
    category, make, channels = MODELS[name]
    torch.manual_seed(0)
    model = make().train(train)
    shape = (2 if train else 1, channels, PLAN_SIDE, PLAN_SIDE)
    row = {
        "model": name,
        "category": category,
        "mode": "train" if train else "eval",
        "tile_size": TILE,
        "side": PLAN_SIDE,
    }
    signal.signal(signal.SIGALRM, _alarm)
    start = time.perf_counter()
    signal.alarm(COMPILE_LIMIT_S)
    tile = TILE
    try:
        for _ in range(2):  # a second time with the tile size a TileSizeError asks for
            try:
                try:
                    smodel = fxstream.compile(model, tile_size=tile)
                    row["default"] = "streams"
                except fxstream.StatisticsError as e:
                    row["default"] = "refused"
                    row["refusal"] = {
                        "levels": e.levels,
                        "max_levels": e.max_levels,
                        "predicted_step_ratio": round(e.predicted_step_ratio, 3),
                        "boundary": e.boundary,
                    }
                    smodel = fxstream.compile(model, tile_size=tile, max_levels=None)
                row["compile_s"] = round(time.perf_counter() - start, 1)
                row.update(describe(smodel, shape))
                break
            except fxstream.TileSizeError as e:
                if tile != TILE or not e.minimum:
                    raise
                row["tile_note"] = first_line(e)[:160]
                tile = -(-max(e.minimum) // 128) * 128
                row["tile_size"] = tile
        row["head_ops"] = head_ops(smodel)
        row["whole"] = not row["head_ops"] or row["head_ops"][0] in POOLS  # at most a classifier on pooled features
    except TooSlow as e:
        row["error"] = f"too slow to compile and plan: {e}"
    except Exception as e:  # noqa: BLE001 - recorded, the sweep goes on
        row["error"] = first_line(e)
    finally:
        signal.alarm(0)
    row["plan_s"] = round(time.perf_counter() - start, 1)
    return row


# --- part 2: measured --------------------------------------------------------------------------


def randomise(model: nn.Module) -> nn.Module:
    """Non-trivial norm affine parameters and running statistics (as tests/test_statistics.py)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if isinstance(m, (nn.GroupNorm, nn.modules.batchnorm._NormBase)) and w is not None:
            with torch.no_grad():
                w.copy_(1.0 + 0.3 * torch.randn(w.shape, generator=g))
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
        if isinstance(m, nn.modules.batchnorm._NormBase) and getattr(m, "running_mean", None) is not None:
            m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model


def _out(y):
    return y["out"] if isinstance(y, dict) else y


def step_time(model, x) -> float:
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    _out(model(x)).sum().backward()
    return time.perf_counter() - start


def rel_err(a, b) -> float:
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


def measure_one(name, train, side, tile, side64, tile64, max_levels) -> dict:
    category, make, channels = MODELS[name]
    row = {"model": name, "mode": "train" if train else "eval", "side": side, "tile_size": tile}
    try:
        torch.manual_seed(0)
        model = randomise(make()).train(train)
        if train:  # dropout draws other masks in the streamed tiles (keyed by position): off for the comparison
            dropouts = [m for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
            for m in dropouts:
                m.eval()
            row["dropout_in_eval"] = len(dropouts)
        batch = 2 if train else 1
        x = torch.randn(batch, channels, side, side)
        smodel = fxstream.compile(model, tile_size=tile, max_levels=max_levels)
        shape = tuple(x.shape)
        row["num_tiles"] = smodel.shape_plan(side, side).num_tiles
        row["predicted_step_ratio"] = round(plan_report(smodel, shape, device="cpu")["predicted_step_ratio"], 3)
        row["levels"] = smodel.program().geometry.levels
        step_time(model, x), step_time(smodel, x)  # warm-up
        pairs = [(step_time(model, x), step_time(smodel, x)) for _ in range(REPEATS)]
        row["plain_s"] = round(stats_.median(p for p, _ in pairs), 3)
        row["streamed_s"] = round(stats_.median(s for _, s in pairs), 3)
        row["measured_ratio"] = round(stats_.median(s / p for p, s in pairs), 3)
        row["pairs"] = [[round(p, 3), round(s, 3)] for p, s in pairs]
        print(
            f"  {name}: {row['num_tiles']} tiles at {side} px, plain {row['plain_s']} s, streamed "
            f"{row['streamed_s']} s, measured {row['measured_ratio']}x, predicted {row['predicted_step_ratio']}x",
            flush=True,
        )
        del smodel
        # float64 exactness, on a smaller image with several tiles
        model64 = copy.deepcopy(model).double()
        x64 = torch.randn(
            batch, channels, side64, side64, generator=torch.Generator().manual_seed(1), dtype=torch.float64
        )
        plain64 = copy.deepcopy(model64)  # train mode: each side updates its own running statistics
        s64 = fxstream.compile(model64, tile_size=tile64, max_levels=max_levels)
        # compile may update train-mode BatchNorm running statistics itself (seen on smp PSPNet, a
        # bug reported separately): count them, then restore them, to compare one call's update
        changed = [
            n for (n, a), (_, b) in zip(model64.named_buffers(), plain64.named_buffers()) if not torch.equal(a, b)
        ]
        with torch.no_grad():
            for (_, a), (_, b) in zip(model64.named_buffers(), plain64.named_buffers()):
                a.copy_(b)
        row["f64"] = {"side": side64, "tile_size": tile64, "num_tiles": s64.shape_plan(side64, side64).num_tiles}
        row["f64"]["buffers_changed_by_compile"] = len(changed)
        row["f64"].update(exactness_pair(plain64, model64, s64, x64))
        print(f"  {name}: float64 {row['f64']}", flush=True)
    except Exception as e:  # noqa: BLE001
        row["error"] = first_line(e)
        print(f"  {name}: {row['error']}", flush=True)
    return row


def exactness_pair(plain, model, smodel, x) -> dict:
    """``exactness`` with the plain reference a separate copy (same parameters), then the
    gradients of the compiled model's parameters compared with the copy's."""
    params_p = [p for p in plain.parameters() if p.requires_grad]
    params_s = [p for p in model.parameters() if p.requires_grad]
    names = ["input"] + [n for n, p in plain.named_parameters() if p.requires_grad]
    x_p, x_s = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = _out(plain(x_p)), _out(smodel(x_s))
    grad = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=ref.dtype)
    # allow_unused: PSPNet (encoder_depth=3) holds the encoder's unused layer4; None -> zeros on both sides
    g_p = torch.autograd.grad(ref, [x_p] + params_p, grad, allow_unused=True)
    g_s = torch.autograd.grad(out, [x_s] + params_s, grad, allow_unused=True)
    unused = sum(a is None and b is None for a, b in zip(g_s, g_p))
    g_p = [torch.zeros_like(p) if g is None else g for g, p in zip(g_p, [x_p] + params_p)]
    g_s = [torch.zeros_like(p) if g is None else g for g, p in zip(g_s, [x_s] + params_s)]
    scale = max(float(g.abs().max()) for g in g_p)
    errors = {"output": rel_err(out.detach(), ref.detach())}
    zero_by_math = 0
    for n, a, b in zip(names, g_s, g_p):
        if float(b.abs().max()) < 1e-9 * scale:
            zero_by_math += 1
            errors[n] = float((a - b).abs().max()) / scale
        else:
            errors[n] = rel_err(a, b)
    buffers = {
        f"buffer:{n}": rel_err(a.double(), b.double())
        for (n, a), (_, b) in zip(model.named_buffers(), plain.named_buffers())
        if a.is_floating_point()
    }
    worst = max(errors, key=errors.get)
    return {
        "max_rel_error": errors[worst],
        "worst": worst,
        "output_error": errors["output"],
        "input_grad_error": errors["input"],
        "max_param_grad_error": max(v for k, v in errors.items() if k not in ("output", "input")),
        "param_grads": len(params_p),
        "zero_by_math_grads": zero_by_math,
        "unused_params": unused,
        "max_buffer_error": max(buffers.values(), default=0.0),
    }


# --- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan-only", action="store_true")
    parser.add_argument("--measure-only", action="store_true")
    parser.add_argument("--models", nargs="*", help="a subset (names as in MODELS)")
    args = parser.parse_args()
    result = {}
    if os.path.exists(RESULTS):
        with open(RESULTS) as f:
            result = json.load(f)
    result["meta"] = {
        "torch": torch.__version__,
        "fxstream": getattr(fxstream, "__version__", "?"),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared)",
        "date": time.strftime("%Y-%m-%d"),
        "plan": {"tile_size": TILE, "side": PLAN_SIDE, "device": "cpu", "schedule": "carry (default)"},
    }
    wanted = lambda n: not args.models or n in args.models  # noqa: E731
    if not args.measure_only:
        plans = {(r["model"], r["mode"]): r for r in result.get("plan", [])}
        for name in MODELS:
            for train in [False] + ([True] if name in TRAIN else []):
                if not wanted(name):
                    continue
                row = plan_one(name, train)
                plans[(name, row["mode"])] = row
                print(json.dumps(row), flush=True)
                result["plan"] = list(plans.values())
                _save(result)
    if not args.plan_only:
        measured = {(r["model"], r["mode"]): r for r in result.get("measured", [])}
        for spec in MEASURE:
            if not wanted(spec[0]):
                continue
            row = measure_one(*spec)
            measured[(row["model"], row["mode"])] = row
            result["measured"] = list(measured.values())
            _save(result)


def _save(result: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
