"""What the generated tile code calls at run time (tile windows, tiled average pooling),
and the run-time settings and autocast state the executor (:mod:`fxstream.executor`) uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .errors import PlannerError
from .plan import Gather
from .progress import StreamStats


def window(t: torch.Tensor, spec: tuple, value: float = 0.0) -> torch.Tensor:
    """Cut from ``t`` (a producer's computed region) exactly what its consumer reads.

    ``spec`` has one entry per spatial axis (see ``plan.Crop`` and ``plan.Gather``):
    a crop, padded with ``value`` where the consumer's window leaves the image, or an
    index gather for reflect/replicate padding at the image border.
    """
    pads = {}
    for entry in spec:
        if isinstance(entry, Gather):
            t = t.index_select(entry.dim, torch.tensor(entry.index, device=t.device))
            continue
        dim, start, stop, pad_lo, pad_hi = entry
        if start != 0 or stop != t.shape[dim]:
            t = t.narrow(dim, start, stop - start)
        if pad_lo or pad_hi:
            pads[dim] = (pad_lo, pad_hi)
    if pads:
        flat = []
        for dim in range(t.dim() - 1, min(pads) - 1, -1):
            flat += list(pads.get(dim, (0, 0)))
        t = F.pad(t, flat, mode="constant", value=value)
    return t


def avg_pool(
    x: torch.Tensor,
    kernel: Sequence[int],
    stride: Sequence[int],
    counts: tuple | None = None,
    divisor: int | None = None,
) -> torch.Tensor:
    """Average pooling of a padded window: the window sum divided by the divisor that the
    whole-image op would use at each output position (``counts`` per axis), or by a
    fixed ``divisor`` (``divisor_override``)."""
    ndim = len(kernel)
    total = _sum_pool(x, kernel, stride)
    if divisor is not None:
        return total / divisor
    shape = [1] * total.dim()
    div = None
    for axis, per_axis in enumerate(counts):
        shape_axis = list(shape)
        shape_axis[total.dim() - ndim + axis] = len(per_axis)
        c = torch.tensor(per_axis, dtype=total.dtype, device=total.device).view(shape_axis)
        div = c if div is None else div * c
    return total / div


def _sum_pool(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    ndim = len(kernel)
    if ndim == 2:
        return F.avg_pool2d(x, kernel, stride, 0, False, True, divisor_override=1)
    if ndim == 3:
        return F.avg_pool3d(x, kernel, stride, 0, False, True, divisor_override=1)
    # avg_pool1d has no divisor_override: sum through a 2D pool with a unit axis.
    return F.avg_pool2d(x.unsqueeze(-2), (1, kernel[0]), (1, stride[0]), 0, False, True, divisor_override=1).squeeze(-2)


@dataclass
class StreamSettings:
    """Run-time settings of a StreamedModule's trunk, shared by its compiled programs.

    * ``input_transform(tile, dtype)``: applied to every tile on the compute device
      before the trunk (e.g. :class:`fxstream.Normalize` for ``uint8`` images);
    * ``output_device``: where the trunk output (and its gradient) is assembled; None
      keeps it on the compute device (``"cpu"`` for dense outputs as large as the image);
    * ``progress``: a tqdm bar over the tiles of each pass;
    * ``stats``: what the trunk did since the last reset (:class:`StreamStats`);
    * ``intercept``: when set, ``trunk(x)`` returns ``intercept(trunk, x)`` instead of
      streaming (used by ``serial_backward`` to split a model at its trunk);
    * ``tile_group``: a :class:`fxstream.distributed.TileGroup` whose ranks split the tiles
      of each image, or None (one process runs them all).
    """

    input_transform: Callable | None = None
    output_device: torch.device | None = None
    progress: bool = False
    stats: StreamStats = field(default_factory=StreamStats)
    intercept: Callable | None = None
    tile_group: Any = None


class AutocastState:
    """The autocast settings of the forward pass, re-entered for the recomputation.

    The autograd engine does not keep the autocast context of the forward pass, so the
    backward recomputation would otherwise run in full precision and produce other
    activations than the forward pass did."""

    DEVICE_TYPES = ("cpu", "cuda")

    def __init__(self) -> None:
        self.states = {d: _autocast_state(d) for d in self.DEVICE_TYPES}

    @contextlib.contextmanager
    def restored(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, (enabled, dtype) in self.states.items():
                if _autocast_state(device_type) != (enabled, dtype):
                    stack.enter_context(torch.autocast(device_type, dtype=dtype, enabled=enabled))
            yield


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    try:  # torch >= 2.4
        return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # older torch: per-device functions
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        return torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()


def check_block(block: torch.Tensor, dims: Sequence[int], box: Sequence[tuple[int, int]]) -> None:
    """A tile's block of one trunk output must have the planned extent ``box`` (per axis ``(lo, hi)``)."""
    expected = tuple(hi - lo for lo, hi in box)
    got = tuple(block.shape[d] for d in dims)
    if got != expected:
        raise PlannerError(f"tile produced a block of size {got}, the plan expected {expected}")
