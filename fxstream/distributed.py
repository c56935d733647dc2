"""Tile-parallel streaming: one image across the ranks of a ``torch.distributed`` group.

``fxstream.compile(model, tile_size=..., tile_group=group)``: every rank of ``group``
receives the same image; the ranks split its tiles into contiguous *bands* of tile rows
(axis-0 blocks), balanced by the pixels each band computes (:func:`balanced_bands`).

* Under ``"recompute"`` tiles are independent: a band is a subset of the tiles.
* Under ``"carry"`` each band carries internally, and a band start recomputes the cone of
  its first output row (``Schedule.bands``, honoured by :mod:`fxstream.planning.tiling`).

Forward: each rank runs its bands' tiles into a zero trunk output; one ``all_reduce``
(sum; the output blocks are disjoint) assembles it on every rank, and the head runs on
every rank. Backward: each rank back-propagates its own tiles with the full output
gradient; the trunk parameter gradients and the input gradient are summed over the group
with one ``all_reduce`` per dtype, inside the trunk's backward, so every rank ends with the
single-process gradients. The head's gradients are the same on every rank (same inputs,
same output gradient) and are not reduced.

Faults: the input shape and a fingerprint of its pixels (``transfer.fingerprint``: a
CRC-32 of 64 small sampled patches) are all-gathered and compared before the first
collective of a call; a shape mismatch raises :class:`InputShapeError` on every rank, and
ranks with different images of one shape (a ``DistributedSampler`` over the tile group)
raise :class:`TileGroupError` naming them; a failed or timed-out
collective (the group's timeout, ``init_process_group(timeout=...)``) raises
:class:`TileGroupError`. The gradient reduction runs inside the trunk's backward, before
autograd writes any trunk ``.grad``; ``serial_backward``/``train_step`` also restore the
head's ``.grad`` when a step fails.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import FxStreamError, InputShapeError, TileGroupError, user_error
from .memory.units import format_bytes
from .planning.schedule import Schedule
from .planning.tiling import ShapePlan, plan_shape

MAX_DIMS = 8  # input dims carried by the shape check (N, C and up to 6 spatial)
DP_LIMIT = 4_000_000  # balanced_bands: the exact split up to ranks * rows**2 steps


def as_process_group(group):
    """A ProcessGroup from ``tile_group=`` (a ProcessGroup or a 1-D DeviceMesh), or None."""
    if group is None:
        return None
    if hasattr(group, "get_group") and hasattr(group, "ndim"):  # a DeviceMesh
        if group.ndim != 1:
            raise user_error(
                TileGroupError,
                f"tile_group is a {group.ndim}-D DeviceMesh; the tiles of one image split over a 1-D group",
                fix="pass the tile dimension of the mesh, e.g. tile_group=mesh['tile']",
            )
        return group.get_group()
    if not isinstance(group, dist.ProcessGroup):
        raise user_error(
            TileGroupError,
            f"tile_group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got {type(group).__name__}",
            fix="pass e.g. torch.distributed.new_group(...) or init_device_mesh(...)['tile']",
        )
    return group


# --- the split: bands of tile rows, balanced by computed pixels ------------------------


def row_work(shape_plan: ShapePlan) -> list[int]:
    """Pixels computed by each tile row (axis-0 block), over all nodes and tiles of the row."""
    axes = shape_plan.axes
    names = [name for name, _ in axes[0][0].computed if name]
    per_axis = [[dict(part.computed) for part in axis] for axis in axes[1:]]
    others = [{name: sum(c[name][1] - c[name][0] for c in axis) for name in names} for axis in per_axis]
    work = []
    for part in axes[0]:
        computed = dict(part.computed)
        work.append(sum((computed[n][1] - computed[n][0]) * math.prod(o[n] for o in others) for n in names))
    return work


def balanced_bands(work: Sequence[int], ranks: int, start_work: Sequence[int] | None = None) -> tuple[int, ...]:
    """The starts of ``ranks`` contiguous, non-empty bands of rows that minimise the largest
    band's work. A band ``[a, b)`` costs ``start_work[a] + sum(work[a + 1 : b])``: under
    carry the first row of a band computes more (it recomputes its cone), ``start_work``;
    by default it is ``work``. Exact (dynamic programming) up to ``DP_LIMIT`` steps, else
    each band ends where the running total is nearest its share."""
    rows = len(work)
    if ranks > rows:
        raise user_error(
            TileGroupError,
            f"the input has {rows} tile rows, too few for {ranks} ranks: every rank needs at least one row",
            fix="use a smaller tile_size (more rows) or a smaller tile group",
        )
    start = list(start_work) if start_work is not None else list(work)
    prefix = [0]
    for w in work:
        prefix.append(prefix[-1] + w)
    if ranks * rows * rows > DP_LIMIT:
        return _nearest_shares(prefix, ranks)

    def cost(a: int, b: int) -> int:
        return start[a] + prefix[b] - prefix[a + 1]

    # best[b]: (largest band, starts) of the best split of rows [0, b) into r bands
    best = {b: (cost(0, b), (0,)) for b in range(1, rows + 1)}
    for r in range(1, ranks):
        best = {
            b: min(((max(best[a][0], cost(a, b)), best[a][1] + (a,)) for a in range(r, b)), key=lambda v: v[0])
            for b in range(r + 1, rows + 1)
        }
    return best[rows][1]


def _nearest_shares(prefix: list[int], ranks: int) -> tuple[int, ...]:
    rows = len(prefix) - 1
    starts = [0]
    for r in range(1, ranks):
        target = prefix[-1] * r / ranks
        lo, hi = starts[-1] + 1, rows - (ranks - r)
        starts.append(min(range(lo, hi + 1), key=lambda k: abs(prefix[k] - target)))
    return tuple(starts)


def banded(shape_plan_of, schedule: Schedule, size: tuple[int, ...], ranks: int) -> ShapePlan:
    """The tiling of an input of spatial ``size`` split into ``ranks`` bands.
    ``shape_plan_of(size, schedule)`` builds a tiling (``tiling.plan_shape``)."""
    base = shape_plan_of(size, schedule.with_bands((0,)))
    if ranks == 1:
        return base
    if not schedule.carries:
        bands = balanced_bands(row_work(base), ranks)
        return dataclasses.replace(base, schedule=schedule.with_bands(bands))
    # under carry the first row of a band recomputes its cone: a tiling where every row
    # starts a band gives each row's work as a band start
    every = shape_plan_of(size, schedule.with_bands(range(base.grid[0])))
    bands = balanced_bands(row_work(base), ranks, row_work(every))
    return shape_plan_of(size, schedule.with_bands(bands))


def band_positions(shape_plan: ShapePlan, band: int) -> range:
    """The raster positions of the tiles of band ``band`` (contiguous: rows are outermost)."""
    bands = shape_plan.schedule.bands + (shape_plan.grid[0],)
    row = math.prod(shape_plan.grid[1:])
    return range(bands[band] * row, bands[band + 1] * row)


def rank_work(shape_plan: ShapePlan) -> list[int]:
    """Pixels computed by each band of ``shape_plan`` (each rank's share of the work)."""
    work = row_work(shape_plan)
    bands = shape_plan.schedule.bands + (len(work),)
    return [sum(work[a:b]) for a, b in zip(bands, bands[1:])]


# --- the collectives ----------------------------------------------------------------------


class TileGroup:
    """The ranks that split the tiles of each image, and the collectives of one call."""

    def __init__(self, group):
        self.group = as_process_group(group)

    def __deepcopy__(self, memo) -> TileGroup:  # copies of a module (e.g. an EMA model) share the group
        return self

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def device(self, fallback: torch.device) -> torch.device:
        """Where this group's collectives take their tensors (CUDA for nccl)."""
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return fallback if fallback.type == "cpu" else torch.device("cpu")

    def shape_plan(self, shape_plan_of, schedule: Schedule, size: tuple[int, ...]) -> ShapePlan:
        return banded(shape_plan_of, schedule, size, self.size)

    def positions(self, shape_plan: ShapePlan) -> range:
        return band_positions(shape_plan, self.rank)

    def check_shape(self, shape: Sequence[int], device: torch.device, fingerprint: int = -1) -> None:
        """All-gather the input shape and ``fingerprint`` (of the pixels, see
        ``transfer.fingerprint``); raise :class:`InputShapeError` on every rank if the shapes
        differ, :class:`TileGroupError` if the fingerprints do."""
        mine = torch.full((MAX_DIMS + 2,), -1, dtype=torch.int64, device=self.device(device))
        mine[0], mine[-1] = len(shape), fingerprint
        mine[1 : 1 + min(len(shape), MAX_DIMS)] = torch.tensor(list(shape)[:MAX_DIMS], dtype=torch.int64)
        gathered = [torch.empty_like(mine) for _ in range(self.size)]
        self._collective("the input-shape check (all_gather)", dist.all_gather, gathered, mine, group=self.group)
        shapes = [tuple(int(v) for v in t[1 : 1 + int(t[0])].tolist()) for t in gathered]
        if any(s != shapes[0] for s in shapes):
            listed = ", ".join(f"rank {r}: {s}" for r, s in enumerate(shapes))
            raise user_error(
                InputShapeError,
                f"the ranks of the tile group got inputs of different shapes ({listed})",
                fix="give every rank of the tile group the same image; split different images over a data group",
            )
        images: dict = {}
        for rank, t in enumerate(gathered):
            images.setdefault(int(t[-1]), []).append(rank)
        if len(images) > 1:
            listed = " / ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}" for r in images.values())
            raise user_error(
                TileGroupError,
                f"the ranks of the tile group got different images of the same shape {shapes[0]}: {listed} (a "
                f"checksum of sampled patches of the pixels differs); the tiles would stitch several images into one",
                fix="give every rank of the tile group the same image (e.g. the same sampler seed and index); "
                "split different images over a data group (DistributedSampler over the data ranks, not the tile ranks)",
            )

    def assemble(self, out: torch.Tensor) -> torch.Tensor:
        """The trunk output on every rank, from each rank's blocks in a zero tensor."""
        self._collective("assembling the trunk output (all_reduce)", dist.all_reduce, out, group=self.group)
        return out

    def reduce(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` over the group in place: one flat all_reduce per dtype and device."""
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for (_, device), members in groups.items():
            flat = torch.cat([t.reshape(-1) for t in members]).to(self.device(device))
            self._collective("summing the trunk gradients (all_reduce)", dist.all_reduce, flat, group=self.group)
            offset = 0
            for t in members:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def _collective(self, what: str, fn, *args, **kwargs) -> None:
        try:
            fn(*args, **kwargs)
        except FxStreamError:
            raise
        except Exception as exc:  # gloo/nccl raise RuntimeError subclasses (DistBackendError, timeouts)
            raise user_error(
                TileGroupError,
                f"rank {self.rank} of a tile group of {self.size} ranks: {what} failed: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                fix="another rank died, timed out or stopped calling the model; every rank of the tile group must "
                "run the same forward and backward passes (the timeout is init_process_group(timeout=...))",
            ) from exc


# --- the split, as `fxstream plan --ranks N` shows it ------------------------------------


def split_report(smodel, input_shape: tuple[int, ...], ranks: int, report: dict, dtype: torch.dtype) -> dict:
    """The bands of ``ranks`` ranks for ``input_shape`` and each rank's predicted work
    (computed pixels over all trunk nodes), peak memory and collective sizes. ``report`` is
    ``fxstream.cli.report.build``'s dict for the same input."""
    trunk = smodel.streamed_trunk
    spatial = tuple(input_shape[2:])
    plan_of = lambda s, schedule: trunk_plan(trunk, s, schedule)  # noqa: E731
    single = plan_of(spatial, trunk.schedule)
    split = banded(plan_of, trunk.schedule, spatial, ranks)
    work = rank_work(split)
    size = torch.empty((), dtype=dtype).element_size()
    params = sum(p.numel() for p in trunk.tile.parameters() if p.requires_grad) * size
    rows = split.schedule.bands + (split.grid[0],)
    return {
        "ranks": ranks,
        "bands": [[a, b] for a, b in zip(rows, rows[1:])],
        "tiles": [len(band_positions(split, r)) for r in range(ranks)],
        "work": work,
        "single_process_work": single.computed,
        "predicted_speedup": single.computed / max(work),
        # each rank keeps the whole trunk output and one tile; its stripes are those of its band
        "peak_bytes_per_rank": report["memory"]["streamed"]["training"]["bytes"],
        "forward_all_reduce_bytes": math.prod(report["trunk_output_shape"]) * size,
        "backward_all_reduce_bytes": params + math.prod(input_shape) * size,
    }


def trunk_plan(trunk, size: tuple[int, ...], schedule: Schedule) -> ShapePlan:
    return plan_shape(trunk.geometry, trunk.plan, size, schedule)


def split_lines(split: dict) -> list[str]:
    """``fxstream plan --ranks N``: one line per rank, then the collectives."""
    total = split["single_process_work"]
    lines = [f"tile-parallel split over {split['ranks']} ranks (bands of tile rows; work = computed pixels):"]
    for r, ((a, b), tiles, work) in enumerate(zip(split["bands"], split["tiles"], split["work"])):
        lines.append(
            f"  rank {r}: tile rows {a}..{b - 1}, {tiles} tiles, work {work:,} px ({work / total:.1%} of one process)"
        )
    lines += [
        f"  predicted speedup {split['predicted_speedup']:.2f}x (single-process work / the largest rank's)",
        f"  peak memory per rank <= {format_bytes(split['peak_bytes_per_rank'])} (the whole trunk output, one tile, "
        "its band's stripes)",
        f"  collectives per step: forward all_reduce {format_bytes(split['forward_all_reduce_bytes'])} (trunk output), "
        f"backward all_reduce {format_bytes(split['backward_all_reduce_bytes'])} (trunk gradients + input gradient)",
    ]
    return lines
