"""Statistics levels and the predicted cost of statistics passes (issue 20), for real models.

A prototype of the level assignment of docs/design-statistics.md, on the graph that
``fxstream.trace`` gives (it does not need fxstream's analysis, which rejects these models today):

* the model runs twice (fx.Interpreter) at two input sizes; a tensor whose shape changes with the
  input size is *spatial*, an image-dependent tensor whose shape does not is *global*;
* a *statistic* is a node with a spatial input and a global output whose value flows back (through
  global nodes only) into a spatial node: a mean/sum/norm/var or adaptive pooling; and a norm
  module that normalises over spatial dims (GroupNorm, InstanceNorm without running statistics,
  train-mode BatchNorm, LayerNorm over spatial dims) holds one;
* ``depth(v)`` of a spatial node is the highest level it depends on; a statistic's level is
  ``1 + depth`` of its input; a global value's level is the highest of its inputs';
* pass ``j`` computes ``A_j``, the spatial ancestors of the level-``j`` statistics' inputs; a node
  in ``u`` of the ``A_j`` runs in ``1 + u`` forward and ``1 + u`` backward passes, so the predicted
  step ratio (carry, no halo) is ``(4 * sum_v F_v (1 + u_v) + 3 F_head) / (3 * (F_trunk + F_head))``
  with ``F_v`` the forward FLOPs of node ``v``.

Usage (from the repository root): PYTHONPATH=. python benchmarks/stats_levels.py [--models basicunet ...] [--train]
Models: basicunet, basicunet3d, monai_unet, segresnet, deeplabv3_resnet50, smp_<fpn|pspnet|pan|upernet|unet>[:encoder],
or any timm model name. Random weights; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

import fxstream

torch.set_num_threads(1)

NORMS = (nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def shapes_at(gm: fx.GraphModule, x: torch.Tensor) -> dict:
    """Node -> output shape (tensors only), by running the graph."""
    shapes = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if isinstance(value, torch.Tensor) and n.op != "output":
                shapes[n] = tuple(value.shape)
            return value

    with torch.no_grad():
        Recorder(gm).run(x)
    return shapes


def norm_statistic(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether a call_module norm normalises with statistics of the current input (over spatial dims)."""
    if node.op != "call_module":
        return False
    m = gm.get_submodule(node.target)
    if isinstance(m, BATCH_NORMS):
        return m.training or m.running_mean is None
    if isinstance(m, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        return m.training or not m.track_running_stats
    if isinstance(m, nn.GroupNorm):
        return True
    if isinstance(m, nn.LayerNorm):
        return None  # decided by its layout: see levels()
    return False


def flops(gm: fx.GraphModule, node: fx.Node, shapes: dict) -> float:
    """Forward FLOPs of a node for one sample: 2 x MACs for convolutions and linear layers,
    one per output element for the rest."""
    out = shapes.get(node)
    if out is None:
        return 0.0
    per_sample = math.prod(out[1:]) if len(out) > 1 else 1
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return 2.0 * per_sample * m.weight[0].numel()
        if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            inp = shapes[node.args[0]]
            return 2.0 * math.prod(inp[1:]) * m.weight[0].numel()
        if isinstance(m, nn.Linear):
            return 2.0 * per_sample * m.in_features
    if node.op == "call_function" and getattr(node.target, "__name__", "") in ("conv1d", "conv2d", "conv3d"):
        weight = node.args[1]
        w = shapes.get(weight) or tuple(weight.meta.get("tensor_shape", ()))
        if w:
            return 2.0 * per_sample * math.prod(w[1:])
    return float(per_sample)


@dataclass
class Levels:  # noqa: PLW1641
    model: str
    levels: int
    statistics: dict  # level -> [(node, kind)]
    pass_fraction: dict  # level -> F(A_j) / F_trunk
    mean_u: float  # FLOP-weighted mean over the trunk of u
    ratio: float  # predicted step ratio over a plain step (carry, h = 1)
    trunk_flops: float
    head_flops: float
    staged: dict = None  # min stride -> (ratio, cuts, bytes stored per input megapixel)


def levels(gm: fx.GraphModule, small: torch.Tensor, large: torch.Tensor, size: int, name: str) -> Levels:
    s1, s2 = shapes_at(gm, small), shapes_at(gm, large)
    graph = list(gm.graph.nodes)
    image = next(n for n in graph if n.op == "placeholder")
    dependent = {image}
    for n in graph:
        if any(i in dependent for i in n.all_input_nodes):
            dependent.add(n)
    spatial = {n for n in dependent if n in s1 and n in s2 and s1[n] != s2[n]}
    global_ = {n for n in dependent if n in s1 and n in s2 and s1[n] == s2[n]}
    depth: dict = {image: 0}
    level: dict = {}
    reducers: dict = {}  # node -> (level, input nodes, kind)
    for n in graph:
        if n is image or n not in dependent:
            continue
        sp_in = [i for i in n.all_input_nodes if i in spatial]
        gl_in = [i for i in n.all_input_nodes if i in global_]
        if n in spatial:
            d = max([depth.get(i, 0) for i in sp_in] + [level.get(i, 0) for i in gl_in] + [0])
            stat = norm_statistic(gm, n)
            if stat is None:  # LayerNorm: statistic when it normalises over a spatial dim
                m = gm.get_submodule(n.target)
                k = len(m.normalized_shape)
                stat = any(a != b for a, b in zip(s1[n][-k:], s2[n][-k:]))
            if stat and sp_in:
                d = max(depth[i] for i in sp_in) + 1
                m = gm.get_submodule(n.target)
                reducers[n] = (d, sp_in, type(m).__name__)
            depth[n] = d
        elif n in global_:
            lv = max([level.get(i, 0) for i in gl_in] + [0])
            if sp_in:
                lv = max(lv, max(depth[i] for i in sp_in) + 1)
                kind = (
                    type(gm.get_submodule(n.target)).__name__
                    if n.op == "call_module"
                    else str(getattr(n.target, "__name__", n.target))
                )
                reducers[n] = (lv, sp_in, kind)
            level[n] = lv
    # which global reducers flow back into the trunk (statistics) and which end it (head)
    feeds_back: dict = {}
    for n in reversed(graph):
        if n in global_:
            feeds_back[n] = any(u in spatial or feeds_back.get(u, False) for u in n.users)
    statistics = {n: r for n, r in reducers.items() if n in spatial or feeds_back.get(n, False)}
    by_level: dict = defaultdict(list)
    for n, (lv, _, kind) in statistics.items():
        by_level[lv].append((n.name, kind))
    L = max(by_level, default=0)
    ancestors = _ancestors(graph)
    a_sets = {}
    for lv in by_level:
        inputs = [i for n, (l2, ins, _) in statistics.items() if l2 == lv for i in ins]
        a_sets[lv] = {a for i in inputs for a in ancestors[i] | {i} if a in spatial}
    outputs = [
        n
        for n in spatial
        if any(u not in spatial and u not in statistics and not feeds_back.get(u, False) for u in n.users)
    ]
    final = {a for o in outputs for a in ancestors[o] | {o} if a in spatial}
    scale = (size / large.shape[-1]) ** (large.dim() - 2)
    F = {n: flops(gm, n, s2) * (scale if n in spatial else 1.0) for n in dependent}
    trunk = sum(F[n] for n in spatial)
    head_flops = sum(F[n] for n in global_)
    u = {n: sum(n in a for a in a_sets.values()) for n in spatial}
    streamed = sum(F[n] * ((n in final) + u[n]) for n in spatial)
    ratio = (4 * streamed + 3 * head_flops) / (3 * (trunk + head_flops))
    mean_u = sum(F[n] * u[n] for n in spatial) / trunk
    fractions = {lv: sum(F[n] for n in a) / trunk for lv, a in sorted(a_sets.items())}
    staged = {}
    for min_stride in STAGE_STRIDES:
        staged[min_stride] = _staged(graph, spatial, statistics, ancestors, F, s2, image, min_stride, head_flops, size)
    result = Levels(name, L, dict(sorted(by_level.items())), fractions, mean_u, ratio, trunk, head_flops)
    result.staged = staged
    return result


STAGE_STRIDES = (4, 8, 16)


def _staged(graph, spatial, statistics, ancestors, F, shapes, image, min_stride, head_flops, size) -> tuple:
    """The predicted step ratio when the trunk is cut into *stages* at every separating node of
    cumulative stride >= ``min_stride`` (its map is stored whole, with its gradient, and later
    stages stream from it): a pass then recomputes only its own stage. Returns (ratio, number of
    cuts, bytes stored per input megapixel in float32, map + gradient)."""
    order = {n: i for i, n in enumerate(graph)}
    reach = {}  # spatial node -> the furthest spatial consumer
    for n in spatial:
        users = [u for u in n.users if u in spatial]
        reach[n] = max((order[u] for u in users), default=order[n])
    nodes = sorted(spatial, key=order.get)
    last_by_stride, furthest = {}, -1
    for n in nodes:  # as fxstream's auto: per cumulative stride, the last separating node
        if furthest <= order[n] and n is not nodes[-1]:  # no spatial edge jumps over n
            stride = shapes[image][-1] / shapes[n][-1]
            if stride >= min_stride:
                last_by_stride[stride] = n
        furthest = max(furthest, reach[n])
    cuts = sorted(last_by_stride.values(), key=order.get)
    stage = {n: sum(order[c] < order[n] for c in cuts) for n in nodes}
    per_level: dict = defaultdict(set)  # level -> the nodes its pass recomputes (its stage only)
    for lv, inputs, _ in statistics.values():
        for i in inputs:
            per_level[lv] |= {a for a in ancestors[i] | {i} if a in spatial and stage[a] == stage[i]}
    u = {n: sum(n in a for a in per_level.values()) for n in nodes}
    trunk = sum(F[n] for n in nodes)
    streamed = sum(F[n] * (1 + u[n]) for n in nodes)
    ratio = (4 * streamed + 3 * head_flops) / (3 * (trunk + head_flops))
    megapixels = size ** (len(shapes[image]) - 2) / 1e6
    scale = (size / shapes[image][-1]) ** (len(shapes[image]) - 2)
    stored = sum(math.prod(shapes[c][1:]) * scale for c in cuts) * 2 * 4 / megapixels
    return ratio, len(cuts), stored


def _ancestors(graph: list) -> dict:
    result: dict = {}
    for n in graph:
        acc = set()
        for i in n.all_input_nodes:
            acc |= result[i] | {i}
        result[n] = acc
    return result


# --- models ------------------------------------------------------------------------------------


def build(name: str, train: bool):
    """(model, small input, large input) for a model name; random weights, nothing downloaded.
    Batch 2 in train mode (BatchNorm on a pooled 1x1 map needs more than one value per channel)."""
    batch = 2 if train else 1
    x2 = lambda s, c=3: torch.randn(batch, c, s, s)  # noqa: E731
    if name == "basicunet":
        from monai.networks.nets import BasicUNet

        return BasicUNet(spatial_dims=2, in_channels=1, out_channels=2), x2(64, 1), x2(96, 1)
    if name == "basicunet3d":
        from monai.networks.nets import BasicUNet

        return (
            BasicUNet(spatial_dims=3, in_channels=1, out_channels=2),
            torch.randn(batch, 1, 32, 32, 32),
            torch.randn(batch, 1, 48, 48, 48),
        )
    if name == "monai_unet":
        from monai.networks.nets import UNet

        m = UNet(2, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="instance")
        return m, x2(64, 1), x2(96, 1)
    if name == "segresnet":
        from monai.networks.nets import SegResNet

        return SegResNet(spatial_dims=2, in_channels=1, out_channels=2), x2(64, 1), x2(96, 1)
    if name == "deeplabv3_resnet50":
        import torchvision

        return torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None), x2(64), x2(96)
    if name.startswith("smp_"):
        import segmentation_models_pytorch as smp

        arch, encoder = name[4:].split(":") if ":" in name else (name[4:], "resnet34")
        cls = {"fpn": smp.FPN, "pspnet": smp.PSPNet, "pan": smp.PAN, "upernet": smp.UPerNet, "unet": smp.Unet}[arch]
        return cls(encoder_name=encoder, encoder_weights=None, classes=2), x2(256), x2(384)
    import timm

    return timm.create_model(name, pretrained=False), x2(64), x2(96)


def report(lv: Levels) -> list[str]:
    lines = [
        f"{lv.model}: {lv.levels} levels, {2 * (lv.levels + 1)} streamed passes; "
        f"FLOP-weighted mean u = {lv.mean_u:.2f}; "
        f"predicted step ratio {lv.ratio:.2f}x plain (carry, no halo; a local trunk: 1.33x)"
    ]
    for level, stats in lv.statistics.items():
        kinds = defaultdict(int)
        for _, kind in stats:
            kinds[kind] += 1
        listed = ", ".join(f"{k} x{c}" for k, c in kinds.items())
        names = ", ".join(n for n, _ in stats[:3]) + (", ..." if len(stats) > 3 else "")
        lines.append(
            f"    level {level:>2}: pass computes {lv.pass_fraction[level]:6.1%} of the trunk FLOPs; {listed} ({names})"
        )
    if lv.levels and lv.staged:
        listed = "; ".join(
            f"stride >= {k}: {r:.2f}x ({c} cuts, {b / 2**20:.1f} MiB stored per input megapixel)"
            for k, (r, c, b) in lv.staged.items()
        )
        lines.append(f"    with stored cuts at separating nodes of {listed}")
    return lines


DEFAULT = ["basicunet", "deeplabv3_resnet50", "smp_fpn", "smp_pspnet", "efficientnet_b0", "convnextv2_atto"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT)
    parser.add_argument("--size", type=int, default=1024, help="image edge the FLOPs are scaled to")
    parser.add_argument("--train", action="store_true", help="train mode (BatchNorm uses batch statistics)")
    args = parser.parse_args()
    for name in args.models:
        model, small, large = build(name, args.train)
        model.train(args.train)
        gm = fxstream.trace(model)
        lv = levels(gm, small, large, args.size, name + (" (train)" if args.train else " (eval)"))
        print("\n".join(report(lv)))


if __name__ == "__main__":
    main()
