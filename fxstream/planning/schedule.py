"""The schedule: how the tiles of a streamed trunk run, as a value.

A :class:`Schedule` is chosen at compile time (``fxstream.compile(..., schedule=...)``) and
read by the tiling (:mod:`fxstream.planning.tiling`), the executor
(:mod:`fxstream.runtime.executor`), the memory model, ``tile_size="auto"``/``boundary="auto"``
and ``fxstream plan``.

* ``"recompute"``: every tile computes the whole input cone of its output block, in the
  no-grad forward pass and again in the backward recomputation. Tiles are independent
  (what several devices can run in parallel), and the work is about ``(1 + 3h) / 3`` of a
  plain step, where ``h`` (:attr:`ShapePlan.halo_overhead`) grows as tiles shrink.
* ``"carry"``: tiles run in raster order; each computes only its own *cells* and reads the
  thin stripes of earlier tiles' cells that its windows overlap (Halide's sliding window
  with storage folding, extended to the backward pass). Every activation is computed once
  in the forward pass and once in the recomputation, and back-propagated once: about 4/3 of
  a plain step at any tile size, plus the stripe copies. Tiles depend on their
  predecessors, and the stripes are kept (for the backward pass) until their last reader
  has been back-propagated.

Both are exact: see the README's "Why it is exact".
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FxStreamError

KINDS = ("carry", "recompute")
DEFAULT = "carry"


@dataclass(frozen=True)
class Schedule:
    """``kind``: 'carry' or 'recompute'. Tiles run in raster order (the last axis fastest);
    the backward pass visits them in reverse order.

    ``bands``: the axis-0 block indices where a new *band* of tile rows starts (always
    ``0`` first). Bands are what the ranks of a tile group run (``fxstream.distributed``).
    Under carry each band carries internally and no stripe crosses a band start: the
    cells of a band's first block row start at the recompute cone of its first output
    row, so neighbouring bands recompute the overlap. Under recompute, tiles are
    independent and bands only group them."""

    kind: str = DEFAULT
    bands: tuple[int, ...] = (0,)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"schedule={self.kind!r} is not a schedule; use one of {', '.join(map(repr, KINDS))}")
        bands = tuple(self.bands)
        if not bands or bands[0] != 0 or any(b <= a for a, b in zip(bands, bands[1:])):
            raise ScheduleError(f"bands={bands!r} must start at 0 and increase strictly")
        object.__setattr__(self, "bands", tuple(int(b) for b in bands))

    def with_bands(self, bands) -> Schedule:
        """This schedule with its tile rows grouped into ``bands``."""
        return Schedule(self.kind, tuple(bands))

    @property
    def carries(self) -> bool:
        return self.kind == "carry"

    def forward_work(self, halo_overhead: float) -> float:
        """Forward-pass work of a streamed step, in whole-image forward passes."""
        return 1.0 if self.carries else halo_overhead

    def step_ratio(self, halo_overhead: float) -> float:
        """Predicted work of a streamed training step over a plain one (which costs about 3
        forward passes: forward plus a backward of twice the forward). Streaming adds a
        no-grad forward: recompute pays the halo ``h`` in all three, carry in none."""
        h = 1.0 if self.carries else halo_overhead
        return (1.0 + 3.0 * h) / 3.0

    def __str__(self) -> str:
        return self.kind


class ScheduleError(FxStreamError):
    """Raised by ``compile`` for an unknown ``schedule=``."""


def as_schedule(value) -> Schedule:
    """``None`` (the default schedule), a kind name, or a :class:`Schedule`."""
    if value is None:
        return Schedule(DEFAULT)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return Schedule(value)
    raise ScheduleError(f"schedule must be one of {', '.join(map(repr, KINDS))} or a Schedule, got {value!r}")
