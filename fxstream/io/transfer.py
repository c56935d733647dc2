"""Moving tiles between where the image lives and where the trunk runs.

The image may live in host memory (optionally pinned, optionally ``uint8``) while the
trunk runs on a GPU: only one tile at a time is copied to the device, and on CUDA the
next tile's copy is issued on a side stream while the current tile computes.
:class:`Normalize` turns a ``uint8`` tile into floats on the device, so a gigapixel
image costs one byte per channel-pixel on the host.

The image may also be an *array-like* (see ``fxstream.io.arrays``): a numpy array or
memmap, a zarr or dask array, or a file opened with :func:`fxstream.open_image`. Then
it is never held whole: each tile's region is read when the schedule needs it, by a
background thread, one tile ahead of the compute. Array-likes have no input gradient.
The backward pass reads every tile again: a checksum of each tile's bytes, taken when the
forward pass reads it, tells whether the array still holds the same pixels then (a
refilled buffer or a rewritten file raises :class:`~fxstream.errors.InputChangedError`).

The executor sees one seam: :func:`as_source` wraps a tensor or an array-like into an
:class:`ImageSource` (shape, dtype, whether an input gradient exists, ``read(region)``),
and :func:`load_tiles` turns a list of regions into ``(region, tile on the device)``.

On a CPU-only machine the same code runs with ``device == x.device``: each tile is a
fresh copy of its crop (so in-place ops in the trunk never touch the image).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import random
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from ..errors import InputChangedError, user_error
from . import arrays

Region = Sequence[tuple[int, int]]  # [lo, hi) per spatial axis

SAMPLE_PATCHES = 64  # fingerprint(): patches sampled per image
SAMPLE_EDGE = 16  # and their edge in pixels, per spatial axis


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
        y = x.to(dtype, copy=True)  # one tile-sized buffer, updated in place (same values as out of place)
        if self.scale != 1.0:
            y.mul_(self.scale)
        if any(self.mean):  # subtracting 0 and dividing by 1 change no value: skipped
            y.sub_(mean)
        if any(s != 1.0 for s in self.std):
            y.div_(std)
        return y

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


class ImageSource:
    """The pixels of one input ``(N, C, *spatial)``: where they live and how to read a region.

    ``differentiable``: whether the executor can return an input gradient for it (a
    tensor that requires grad; never an array-like). ``lazy``: reads cost I/O or
    decoding, so :func:`load_tiles` runs them one tile ahead in a background thread.
    """

    lazy = False

    def __init__(self, shape: Sequence[int], dtype: torch.dtype, device: torch.device, differentiable: bool):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = dtype
        self.device = device
        self.differentiable = differentiable

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def channels(self) -> int:
        return self.shape[1]

    @property
    def spatial_size(self) -> tuple[int, ...]:
        return self.shape[2:]

    def read(self, region: Region, dims: Sequence[int] | None = None) -> torch.Tensor:
        """The pixels over ``region`` (``[lo, hi)`` along each of ``dims``, default the
        spatial dims), on :attr:`device`. The result may be a view of the image."""
        raise NotImplementedError

    def read_tile(self, region: Region, dims: Sequence[int] | None = None) -> torch.Tensor:
        """:meth:`read`, for a tile of a forward or backward pass (a source whose pixels may
        change behind fxstream's back checks here that they did not)."""
        return self.read(region, dims)

    def _dims(self, dims: Sequence[int] | None) -> Sequence[int]:
        return range(2, len(self.shape)) if dims is None else dims


class TensorSource(ImageSource):
    """A tensor image: reads are views, copied by :func:`load_tiles`."""

    def __init__(self, tensor: torch.Tensor):
        super().__init__(tensor.shape, tensor.dtype, tensor.device, tensor.requires_grad)
        self.tensor = tensor

    def read(self, region: Region, dims: Sequence[int] | None = None) -> torch.Tensor:
        return crop(self.tensor, self._dims(dims), region)


class ArraySource(ImageSource):
    """An array-like image: each read slices the array and returns a new CPU tensor.

    The array belongs to the caller, who may refill it between the forward and the backward
    pass (a tensor changed in place trips autograd's version check; an array does not).
    So :meth:`read_tile` keeps a CRC-32 of the bytes of every tile region it reads first,
    and a later read of the same region must find the same bytes. At about 2 GB/s on one
    core, in the background reading thread, that is a small part of a tile's read."""

    lazy = True

    def __init__(self, array: Any):
        super().__init__(array.shape, arrays.torch_dtype(array.dtype), torch.device("cpu"), False)
        self.array = array
        self._checksums: dict = {}

    def read(self, region: Region, dims: Sequence[int] | None = None) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        for dim, (lo, hi) in zip(self._dims(dims), region):
            index[dim] = slice(lo, hi)
        return arrays.read_region(self.array, tuple(index))

    def read_tile(self, region: Region, dims: Sequence[int] | None = None) -> torch.Tensor:
        tile = self.read(region, dims)  # a new, contiguous tensor (arrays.read_region)
        key = (tuple(tuple(r) for r in region), tuple(self._dims(dims)))
        checksum = zlib.crc32(tile.numpy())
        if self._checksums.setdefault(key, checksum) != checksum:
            where = " x ".join(f"[{lo}, {hi})" for lo, hi in key[0])
            raise user_error(
                InputChangedError,
                f"the image changed between the forward and the backward pass: its region {where} holds other "
                f"pixels than when the forward pass read it (the image is a {type(self.array).__name__}, read again "
                f"tile by tile in backward: a loader refilled the buffer, or the file was rewritten); the gradients "
                f"would mix two images",
                fix="finish the backward pass (or serial_backward/train_step) before the array is refilled or the "
                "file rewritten, or pass a copy that nothing changes (e.g. np.array(buffer))",
                region=key[0],
            )
        return tile


def as_source(x: Any) -> ImageSource:
    """The :class:`ImageSource` of a tensor, an array-like, or a source (returned as is)."""
    if isinstance(x, ImageSource):
        return x
    if isinstance(x, torch.Tensor):
        return TensorSource(x)
    if arrays.is_array_like(x):
        return ArraySource(x)
    raise TypeError(f"expected a tensor or an array-like image (.shape, .dtype, slicing), got {type(x).__name__}")


def fingerprint(x: Any) -> int:
    """A CRC-32 of a fixed sample of the image ``x`` (a tensor, an array-like or a source):
    ``SAMPLE_PATCHES`` patches of ``SAMPLE_EDGE`` pixels per spatial axis (every sample and
    channel), one per cell of a regular grid, at offsets drawn from the image's shape. Two
    images of the same shape and dtype get the same fingerprint if they hold the same
    pixels, and almost surely different ones if they are different images (a few dozen
    small reads, never the whole image; ``fxstream.distributed`` compares it across ranks)."""
    source = as_source(x)
    size = source.spatial_size
    draw = random.Random(zlib.crc32(repr((source.shape, str(source.dtype))).encode()))
    per_axis = max(1, round(SAMPLE_PATCHES ** (1 / max(len(size), 1))))
    starts = []
    for n in size:
        edge = min(SAMPLE_EDGE, n)
        cells = [(k * n // per_axis, (k + 1) * n // per_axis) for k in range(per_axis)]
        starts.append([(min(lo + draw.randrange(max(hi - lo, 1)), n - edge), edge) for lo, hi in cells])
    checksum = 0
    for corner in itertools.product(*starts):
        patch = source.read([(lo, lo + edge) for lo, edge in corner]).detach().cpu().contiguous()
        checksum = zlib.crc32(patch.reshape(-1).view(torch.uint8).numpy(), checksum)
    return checksum


def load_tiles(x: Any, regions: Sequence[Region], dims: Sequence[int], device: torch.device) -> Iterator:
    """Yield ``(region, pixels of x over region on device)`` for every region, in order.

    ``x`` is a tensor, an array-like or an :class:`ImageSource`. Every yielded tile is a
    new tensor (in-place ops never touch the image). An array-like's region ``i + 1`` is
    read by a background thread while tile ``i`` computes. From host memory to CUDA, the
    copy of tile ``i + 1`` is issued on a side stream before tile ``i`` is handed out,
    so it overlaps tile ``i``'s compute."""
    source = as_source(x)
    if source.lazy:
        host: Iterable[torch.Tensor] = _read_ahead(source, regions, dims)
    else:
        host = (source.read_tile(region, dims) for region in regions)
    if source.device == device or device.type != "cuda":
        for region, t in zip(regions, host):
            yield region, t.to(device) if source.lazy else to_device(t, device)
        return
    yield from zip(regions, _side_stream_copies(host, device))


def _read_ahead(source: ImageSource, regions: Sequence[Region], dims: Sequence[int]) -> Iterator[torch.Tensor]:
    """``source.read(region)`` for every region, each read started while the caller
    works on the previous one (one background thread, one read ahead)."""
    if not regions:
        return
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fxstream-read") as pool:
        pending = pool.submit(source.read_tile, regions[0], dims)
        for i in range(len(regions)):
            tile = pending.result()
            if i + 1 < len(regions):
                pending = pool.submit(source.read_tile, regions[i + 1], dims)
            yield tile


def _side_stream_copies(host: Iterable[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """Each tensor of ``host`` on the CUDA ``device``, copied on a side stream one ahead."""
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def issue(t: torch.Tensor):
        with torch.cuda.stream(stream):
            moved = to_device(t, device)
            done = torch.cuda.Event()
            done.record(stream)
        return moved, done

    tiles = iter(host)
    first = next(tiles, None)
    pending = issue(first) if first is not None else None
    while pending is not None:
        moved, done = pending
        following = next(tiles, None)
        pending = issue(following) if following is not None else None
        compute.wait_event(done)
        moved.record_stream(compute)  # allocated on the side stream, used on the compute stream
        yield moved
