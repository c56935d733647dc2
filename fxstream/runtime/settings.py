"""The run-time settings of a streamed trunk, and the state the executor
(:mod:`fxstream.runtime.executor`) carries from the forward pass to the backward pass."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import PlannerError
from .progress import StreamStats


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
