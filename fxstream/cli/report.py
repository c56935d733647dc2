"""The plan inspection report: everything ``fxstream plan`` shows, as one JSON-ready dict.

Built from shapes only: the plan and the tiling come from sizes, and the per-node
channel counts from one run of the trunk on a tiny input (:mod:`fxstream.memory.nodestats`).
The full-size image is never allocated.

Schema ``fxstream.plan/1`` (stable; new keys may be added, none removed or renamed).
Sizes are per spatial axis, in the order of the input's spatial dims; bytes are ints.

``schema``, ``model`` (str), ``input_shape`` ([N, C, *spatial]), ``dtype`` (str),
``ndim``, ``boundary`` (trunk output node), ``trunk_output_shape``, ``tile_size``,
``output_block`` (trunk-output pixels per tile, at most), ``largest_block`` (the largest
block of this input's tiling: blocks are balanced, as equal as possible), ``stride``,
``receptive_field``, ``halo`` ([[left, right], ...] image pixels), ``grid`` (tiles per
axis), ``num_tiles``, ``halo_overhead`` (pixels computed over all tiles / one
whole-image pass), ``redundant_compute_percent`` ((FLOP-weighted overhead - 1) * 100),
``nodes``: one object per trunk node with ``name``, ``op``, ``module_path``, ``kernel``,
``extent`` (window extent per axis, dilation included), ``op_stride``, ``padding``
([[lo, hi], ...]), ``dilation`` (null where the op has none), ``stride`` (cumulative),
``receptive_field``, ``halo``, ``interior_region`` (pixels per axis an interior tile
computes), ``activation_bytes`` (for that region, batch included),
``saved`` (autograd keeps it for the backward pass),
``schedule`` ('carry' or 'recompute'), ``device`` (the type of compute device the
prediction is for: 'cuda', an accelerator, by default; or 'cpu'), ``output_device`` (where
the trunk output is assembled, null: the compute device), ``stripes`` (where carry keeps
its stripes on that device: 'device', 'host' or 'banded'; null under recompute),
``bands`` (banded carry: bands of tile rows, else 1), ``band_rows`` (banded: tile rows per
band, else null), ``stripe_store_bytes`` (every stripe of the tiling),
``predicted_step_ratio`` (a step's work over a plain step's, from the FLOP-weighted halo overhead),
``memory``: ``{"streamed"|"plain": {"training"|"inference": {"bytes", "phase", "parts"}},
"budget": bytes or null, "fits": bool or null}``; ``choice`` (the CLI only: the reason
for an automatic tile size or boundary, or null).

``bytes`` is the peak of all the step's tensors, wherever they live (on a CPU compute
device, the one memory's peak). A streamed prediction also has ``device_bytes`` and
``host_bytes`` (with ``device_phase``/``device_parts`` and ``host_phase``/``host_parts``):
the peaks of the tensors on the compute device and in host memory. On an accelerator the
input is host-resident (or read lazily), the "host" placement keeps its stripe store on the
host, and ``output_device='cpu'`` puts the trunk output, its gradient and the head there;
each of the two peaks may fall in another phase than ``bytes``. On a CPU, ``device_bytes``
equals ``bytes`` and ``host_bytes`` is 0. ``fits`` compares the budget with ``device_bytes``.
"""

from __future__ import annotations

import math

import torch

from ..memory.auto import trunk_flops
from ..memory.model import MemoryModel, parameter_bytes
from ..memory.nodestats import measure
from ..module import StreamedModule
from ..planning.plan import node_sizes
from ..planning.schedule import DEFAULT_BAND_ROWS

SCHEMA = "fxstream.plan/1"


def memory_model(
    smodel: StreamedModule, input_shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu"
) -> tuple:
    """The :class:`MemoryModel` of a compiled model for ``input_shape`` (N, C, *spatial) on a
    compute device of type ``device`` (its ``output_device`` is the model's), and the
    per-node statistics it uses."""
    program = smodel.program()
    stats = measure(program.analysis, program.geometry, input_shape[1], dtype)
    streamed = {s.name for s in program.geometry.steps}
    params = parameter_bytes(program.analysis, streamed, torch.empty((), dtype=dtype).element_size())
    trunk = smodel.streamed_trunk  # without a tile group its tilings are the model's: share its cache
    shared = trunk.shape_plan if trunk.tile_group is None else None
    output_device = smodel.settings.output_device
    memory = MemoryModel(
        program.geometry,
        program.plan,
        stats,
        params,
        input_shape[0],
        schedule=program.schedule,
        shape_plans=shared,
        device=device,
        output_device=None if output_device is None else output_device.type,
    )
    return memory, stats


def build(
    smodel: StreamedModule,
    input_shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    model_name: str = "",
    budget: int | None = None,
    device: str = "cuda",
) -> dict:
    """The report for ``smodel`` on inputs of ``input_shape`` (see the module docstring),
    predicted for a compute device of type ``device`` (default: an accelerator)."""
    program = smodel.program()
    geo, plan, analysis = program.geometry, program.plan, program.analysis
    spatial = tuple(input_shape[2:])
    model, stats = memory_model(smodel, input_shape, dtype, device)
    sizes = node_sizes(geo, spatial)
    shapes = model.tile_shapes(spatial)  # the distinct tiles, without cutting every one
    computed = sum(s.count * sum(s.px[step.name] for step in geo.steps) for s in shapes)
    whole = sum(math.prod(sizes[step.name]) for step in geo.steps)
    shape_plan = smodel.shape_plan(*spatial)
    strides = {node.name: node.stride for node in plan.nodes}
    splits = [[part.block for part in axis] for axis in shape_plan.axes]
    grid = [len(split) for split in splits]
    estimate = model.estimate(spatial)
    training = model.budgeted(estimate.streamed_training)
    schedule = shape_plan.schedule
    bands = len(shape_plan.band_ranges(range(shape_plan.num_tiles))) if schedule.banded else 1
    flops = _flop_overhead(model, stats, spatial)  # FLOP-weighted halo overhead h
    return {
        "schema": SCHEMA,
        "model": model_name,
        "input_shape": list(input_shape),
        "dtype": str(dtype).replace("torch.", ""),
        "ndim": geo.ndim,
        "boundary": plan.boundary,
        "trunk_output_shape": _output_shape(stats, geo, geo.output, input_shape[0], sizes),
        "trunk_outputs": [
            {
                "name": name,
                "shape": _output_shape(stats, geo, name, input_shape[0], sizes),
                "stride": list(strides[name]),
                "bytes": int(input_shape[0] * stats.by_name()[name].bytes_per_pixel * math.prod(sizes[name])),
            }
            for name in geo.outputs
        ],
        "tile_size": list(plan.tile_size),
        "output_block": list(plan.block),
        "largest_block": [max(hi - lo for lo, hi in split) for split in splits],
        "stride": list(plan.stride),
        "receptive_field": list(plan.receptive_field),
        "halo": [list(h) for h in plan.halo],
        "grid": grid,
        "num_tiles": math.prod(grid),
        "halo_overhead": computed / whole,
        "schedule": schedule.kind,
        "device": device,
        "output_device": None if smodel.settings.output_device is None else str(smodel.settings.output_device),
        "stripes": model.placement,
        "bands": bands,
        "band_rows": (schedule.band_rows or DEFAULT_BAND_ROWS) if schedule.banded else None,
        "stripe_store_bytes": model.stripe_bytes(spatial),
        "predicted_step_ratio": schedule.step_ratio(flops, bands),
        "redundant_compute_percent": (flops - 1) * 100,
        "nodes": _nodes(model, stats, analysis, input_shape[0]),
        "memory": {
            **estimate.to_dict(),
            "budget": budget,
            "fits": None if budget is None else training <= budget,
            "head_counted": stats.head is not None,
        },
    }


def _nodes(model: MemoryModel, stats, analysis, batch: int) -> list[dict]:
    by_name = stats.by_name()
    regions = model.interior_pixels(model.plan.tile_size)
    lengths = {name: [a * n + b for (a, b), n in zip(axes, model.plan.block)] for name, axes in model._affine.items()}
    verdicts = {node.name: v for node, v in analysis.verdicts.items()}
    rows = []
    for node in model.plan.nodes:
        params = getattr(verdicts.get(node.name), "params", {}) or {}
        dilation = params.get("dilation")
        rows.append(
            {
                "name": node.name,
                "op": node.op,
                "module_path": node.module_path,
                "kernel": _kernel(node.kernel, dilation),
                "extent": _list(node.kernel),
                "op_stride": _list(node.op_stride),
                "padding": [list(p) for p in node.padding] if node.padding else None,
                "dilation": list(dilation) if dilation is not None else None,
                "stride": list(node.stride),
                "receptive_field": list(node.receptive_field),
                "halo": [list(h) for h in node.halo],
                "interior_region": [int(v) for v in lengths[node.name]],
                "activation_bytes": int(batch * by_name[node.name].bytes_per_pixel * int(regions[node.name])),
                "saved": by_name[node.name].saved,
            }
        )
    return rows


def _kernel(extent, dilation) -> list | None:
    """Kernel size from the window extent ``d*(k-1) + 1`` and the dilation ``d``."""
    if extent is None:
        return None
    if dilation is None:
        return list(extent)
    return [(e - 1) // d + 1 for e, d in zip(extent, dilation)]


def _list(values) -> list | None:
    return list(values) if values is not None else None


def _output_shape(stats, geo, name: str, batch: int, sizes: dict) -> list[int]:
    probe = list(stats.by_name()[name].shape)
    for dim, n in zip(geo.axis_dims(name), sizes[name]):
        probe[dim] = n
    probe[0] = batch
    return probe


def _flop_overhead(model: MemoryModel, stats, spatial: tuple[int, ...]) -> float:
    """FLOPs of all tiles over the FLOPs of one whole-image pass of the streamed nodes."""
    tiled, whole, _ = trunk_flops(model, stats, model.geo, spatial)
    return tiled / whole
