"""Moving tiles between where the image lives and where the trunk runs.

The image may live in host memory (optionally pinned, optionally ``uint8``) while the
trunk runs on a GPU: only one tile at a time is copied to the device, and on CUDA the
next tile's copy is issued on a side stream while the current tile computes.
:class:`Normalize` turns a ``uint8`` tile into floats on the device, so a gigapixel
image costs one byte per channel-pixel on the host.

On a CPU-only machine the same code runs with ``device == x.device``: each tile is a
fresh copy of its crop (so in-place ops in the trunk never touch the image).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class Normalize(torch.nn.Module):
    """Per-tile input normalisation ``(x * scale - mean) / std``, per channel.

    Pass it as ``fxstream.compile(..., input_transform=fxstream.Normalize(mean, std,
    scale=1/255))`` and feed the raw ``uint8`` image: every tile is converted on the
    compute device, in the dtype of the trunk's parameters (or ``dtype``). The result
    equals normalising the whole image first, element for element.

    ``mean`` and ``std`` are per-channel sequences (channel dim 1) or scalars.
    """

    def __init__(
        self,
        mean: Sequence[float] | float = 0.0,
        std: Sequence[float] | float = 1.0,
        scale: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.mean = tuple(mean) if isinstance(mean, Sequence) else (float(mean),)
        self.std = tuple(std) if isinstance(std, Sequence) else (float(std),)
        self.scale = float(scale)
        self.dtype = dtype

    def forward(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = self.dtype or dtype or (x.dtype if x.is_floating_point() else torch.get_default_dtype())
        shape = (1, -1) + (1,) * (x.dim() - 2)
        mean = torch.tensor(self.mean, dtype=dtype, device=x.device).view(shape)
        std = torch.tensor(self.std, dtype=dtype, device=x.device).view(shape)
        return (x.to(dtype) * self.scale - mean) / std

    def extra_repr(self) -> str:
        return f"mean={self.mean}, std={self.std}, scale={self.scale}"


def crop(t: torch.Tensor, dims: Sequence[int], intervals: Sequence[tuple[int, int]]) -> torch.Tensor:
    """The view of ``t`` over ``[lo, hi)`` along each of ``dims``."""
    for dim, (lo, hi) in zip(dims, intervals):
        t = t.narrow(dim, lo, hi - lo)
    return t


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy of ``t`` on ``device`` (always a new tensor). Host to CUDA copies go
    through pinned memory and do not block the host."""
    if t.device == device:
        return t.clone()
    if t.device.type == "cpu" and device.type == "cuda":
        staging = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)  # cached by torch's host allocator
        return staging.copy_(t).to(device, non_blocking=True)
    return t.to(device)


def load_tiles(x: torch.Tensor, tiles: Sequence, dims: Sequence[int], device: torch.device) -> Iterator:
    """Yield ``(tile, crop of x on device)`` for every tile, in order.

    From host memory to CUDA, the copy of tile ``i + 1`` is issued on a side stream
    before tile ``i`` is handed out, so it overlaps tile ``i``'s compute."""
    if x.device == device or device.type != "cuda":
        for tile in tiles:
            yield tile, to_device(crop(x, dims, tile.region), device)
        return
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def issue(tile):
        with torch.cuda.stream(stream):
            moved = to_device(crop(x, dims, tile.region), device)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    pending = issue(tiles[0]) if tiles else None
    for i, tile in enumerate(tiles):
        moved, done = pending
        if i + 1 < len(tiles):
            pending = issue(tiles[i + 1])
        compute.wait_event(done)
        moved.record_stream(compute)  # allocated on the side stream, used on the compute stream
        yield tile, moved
