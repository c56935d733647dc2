"""The schedule: how the tiles of a streamed trunk run, and where the carry schedule keeps
its stripes, as a value.

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
  predecessors, and the backward pass reads every stripe again.

**Where carry keeps its stripes** (``stripes=``). The stripes that the backward pass reads
again add up to O(area / tile): ResNet-34 at tile 2048 stores 4.15 GiB of them at 32768²
and about 39 GiB at 100,000². Nothing on the compute device may grow with the image, so:

* ``"device"``: every stripe stays on the compute device from the forward pass until its
  last reader is back-propagated. The fastest; memory grows with the image area.
* ``"host"``: the compute device keeps only the stripes that later forward tiles still read
  (about one row of tiles' worth); every stripe is also copied to host memory (pinned,
  asynchronously on a side stream), and the backward pass copies each tile's stripes back
  while the tile before it computes. Same arithmetic as ``"device"`` (about 4/3), plus
  copies that overlap compute. On a CPU compute device the host *is* the device: the store
  holds separate CPU copies (what the tests use to exercise it).
* ``"banded"``: the tile rows are cut into bands of ``band_rows`` rows that share no stripe
  (a band starts at the recompute cone of its first row, as tile-group bands do). The
  forward pass keeps only the stripes later forward tiles still read, and those of the last
  band; the backward pass visits the bands in reverse and rebuilds each one's stripes with
  a no-grad carry over the band before back-propagating it. One more forward pass (about
  5/3 of plain) plus the band-start cones; memory is one band's stripes, on any device,
  with no host memory either.
* ``"auto"`` (the default): ``"host"`` on an accelerator, ``"device"`` on a CPU (where host
  and device are one memory); ``memory_budget=`` with ``tile_size="auto"`` may choose
  another (:mod:`fxstream.memory.auto`).

All are exact: see the README's "Why it is exact".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import FxStreamError, user_error

KINDS = ("carry", "recompute")
DEFAULT = "carry"
PLACEMENTS = ("auto", "device", "host", "banded")
DEFAULT_BAND_ROWS = 4  # "banded" without band_rows: a band-start cone every 4 tile rows


@dataclass(frozen=True)
class Schedule:
    """``kind``: 'carry' or 'recompute'. Tiles run in raster order (the last axis fastest);
    the backward pass visits them in reverse order.

    ``bands``: the axis-0 block indices where a new *band* of tile rows starts (always
    ``0`` first). Bands are what the ranks of a tile group run (``fxstream.distributed``).
    Under carry each band carries internally and no stripe crosses a band start: the
    cells of a band's first block row start at the recompute cone of its first output
    row, so neighbouring bands recompute the overlap. Under recompute, tiles are
    independent and bands only group them.

    ``stripes`` (carry only): where the stripes live between the forward and the backward
    pass, one of ``PLACEMENTS`` (see the module docstring). ``band_rows`` (``"banded"``
    only): tile rows per band, within each band of ``bands``; None is
    ``DEFAULT_BAND_ROWS``."""

    kind: str = DEFAULT
    bands: tuple[int, ...] = (0,)
    stripes: str = "auto"
    band_rows: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ScheduleError(f"schedule={self.kind!r} is not a schedule; use one of {', '.join(map(repr, KINDS))}")
        bands = tuple(self.bands)
        if not bands or bands[0] != 0 or any(b <= a for a, b in zip(bands, bands[1:])):
            raise ScheduleError(f"bands={bands!r} must start at 0 and increase strictly")
        object.__setattr__(self, "bands", tuple(int(b) for b in bands))
        if self.stripes not in PLACEMENTS:
            raise user_error(
                ScheduleError,
                f"stripes={self.stripes!r} is not a stripe placement",
                fix=f"use one of {', '.join(map(repr, PLACEMENTS))}",
            )
        if self.kind == "recompute" and self.stripes != "auto":
            raise user_error(
                ScheduleError,
                f"stripes={self.stripes!r} with the recompute schedule, which keeps no stripes",
                fix="use Schedule('carry', stripes=...), or drop stripes=",
            )
        if self.band_rows is not None:
            rows = self.band_rows
            if self.stripes != "banded" or isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
                raise user_error(
                    ScheduleError,
                    f"band_rows={rows!r}: tile rows per band of the banded carry schedule, a positive int",
                    fix="use Schedule('carry', stripes='banded', band_rows=4), or drop band_rows=",
                )

    def with_bands(self, bands) -> Schedule:
        """This schedule with its tile rows grouped into ``bands``."""
        return dataclasses.replace(self, bands=tuple(bands))

    def with_stripes(self, stripes: str, band_rows: int | None = None) -> Schedule:
        """This schedule with its stripes kept at ``stripes`` (``band_rows`` for ``"banded"``)."""
        return dataclasses.replace(self, stripes=stripes, band_rows=band_rows)

    @property
    def carries(self) -> bool:
        return self.kind == "carry"

    @property
    def banded(self) -> bool:
        """Whether the backward pass rebuilds the stripes band by band."""
        return self.carries and self.stripes == "banded"

    def placement(self, device_type: str) -> str | None:
        """Where the stripes live on a compute device of type ``device_type`` ('cpu',
        'cuda', ...): 'device', 'host' or 'banded'; None under recompute. ``"auto"`` is
        'host' on an accelerator and 'device' on a CPU."""
        if not self.carries:
            return None
        if self.stripes == "auto":
            return "device" if device_type == "cpu" else "host"
        return self.stripes

    def band_starts(self, rows: int) -> tuple[int, ...]:
        """The tile rows (of ``rows``) where the tiling starts a band: ``bands``, and under
        ``"banded"`` every ``band_rows`` rows from each of them."""
        if not self.banded:
            return self.bands
        step = self.band_rows or DEFAULT_BAND_ROWS
        ends = self.bands[1:] + (rows,)
        return tuple(r for start, end in zip(self.bands, ends) for r in range(start, max(end, start + 1), step))

    def forward_work(self, halo_overhead: float) -> float:
        """Forward-pass work of a streamed step, in whole-image forward passes."""
        return 1.0 if self.carries and not self.banded else halo_overhead

    def step_ratio(self, halo_overhead: float, bands: int = 1) -> float:
        """Predicted work of a streamed training step over a plain one (which costs about 3
        forward passes: forward plus a backward of twice the forward). Streaming adds a
        no-grad forward: recompute pays the halo ``h`` in all three, carry in none. Banded
        carry over ``bands`` bands rebuilds all but the last band's stripes (one more
        forward of ``1 - 1/bands``), and its band starts recompute cones (``h > 1``)."""
        if not self.carries:
            return (1.0 + 3.0 * halo_overhead) / 3.0
        if not self.banded:
            return 4.0 / 3.0
        return (4.0 + (1.0 - 1.0 / max(bands, 1))) * halo_overhead / 3.0

    def __str__(self) -> str:
        if not self.carries or self.stripes == "auto":
            return self.kind
        if self.banded:
            return f"{self.kind} (banded, {self.band_rows or DEFAULT_BAND_ROWS} tile rows per band)"
        return f"{self.kind} (stripes on the {self.stripes})"


class ScheduleError(FxStreamError):
    """Raised by ``compile`` for an unknown ``schedule=`` or stripe placement."""


def as_schedule(value) -> Schedule:
    """``None`` (the default schedule), a kind name, or a :class:`Schedule`."""
    if value is None:
        return Schedule(DEFAULT)
    if isinstance(value, Schedule):
        return value
    if isinstance(value, str):
        return Schedule(value)
    raise ScheduleError(f"schedule must be one of {', '.join(map(repr, KINDS))} or a Schedule, got {value!r}")
