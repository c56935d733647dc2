"""Array-likes as images: detection, lazy batch slices, and reading a region into a tensor.

An *array-like* is anything with ``.shape``, ``.dtype`` and numpy-style basic slicing
(ints, slices, ``...``) that returns a numpy array, or something ``np.asarray`` turns
into one: numpy arrays and memmaps, zarr arrays, dask arrays, :class:`fxstream.io.slides.SlideArray`.
fxstream never reads more of it than the region of the tile it is computing, and reads
memmaps through their file so that the image never becomes resident in the process.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

import numpy as np
import torch

from ..errors import InputShapeError

Index = tuple[int | slice, ...]


def is_array_like(x: Any) -> bool:
    """Whether ``x`` can stand in for an image tensor (a tensor is not an array-like)."""
    if isinstance(x, torch.Tensor):
        return False
    return hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "__getitem__")


def is_image(x: Any) -> bool:
    """A tensor or an array-like: one batch, as opposed to a sequence of micro-batches."""
    return isinstance(x, torch.Tensor) or is_array_like(x)


def torch_dtype(dtype: Any) -> torch.dtype:
    """The torch dtype of a numpy-style dtype (byte order ignored: reads convert to native)."""
    try:
        return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype).newbyteorder("="))).dtype
    except TypeError:
        raise InputShapeError(
            f"an image array-like has dtype {dtype}, which torch has no equivalent for; "
            f"fix: give it a numeric dtype (uint8, uint16, float32...)"
        ) from None


def normalize_index(key: Any, shape: tuple[int, ...]) -> Index:
    """``key`` (basic indexing: ints, slices, one ``...``) as one int or slice per dim,
    ints made non-negative and slices resolved against ``shape``."""
    key = key if isinstance(key, tuple) else (key,)
    if any(k is None for k in key) or sum(k is Ellipsis for k in key) > 1:
        raise IndexError(f"only ints, slices and one '...' index an image array-like, got {key!r}")
    if Ellipsis in key:
        at = key.index(Ellipsis)
        key = key[:at] + (slice(None),) * (len(shape) - len(key) + 1) + key[at + 1 :]
    if len(key) > len(shape):
        raise IndexError(f"too many indices ({len(key)}) for an array of shape {shape}")
    key = key + (slice(None),) * (len(shape) - len(key))
    out: list[int | slice] = []
    for k, n in zip(key, shape):
        if isinstance(k, slice):
            out.append(slice(*k.indices(n)))
        elif isinstance(k, (int, np.integer)):
            if not -n <= k < n:
                raise IndexError(f"index {k} is out of bounds for a dim of size {n}")
            out.append(int(k) % n)
        else:
            raise IndexError(f"only ints, slices and one '...' index an image array-like, got {k!r}")
    return tuple(out)


class BatchView:
    """Samples ``[start, stop)`` of an array-like, without reading anything: slicing a
    zarr or slide array would read the pixels, slicing this view does not."""

    def __init__(self, array: Any, start: int, stop: int):
        self.array, self.start, self.stop = array, start, min(stop, array.shape[0])
        self.shape = (self.stop - self.start, *array.shape[1:])
        self.dtype = array.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> Any:
        first, *rest = normalize_index(key, self.shape)
        if isinstance(first, int):
            first = first + self.start
        else:
            first = slice(first.start + self.start, first.stop + self.start, first.step)
        return self.array[(first, *rest)]

    def __repr__(self) -> str:
        return f"BatchView({self.array!r}, {self.start}, {self.stop})"


def batch_slice(x: Any, start: int, stop: int) -> Any:
    """Samples ``[start, stop)`` of a tensor or an array-like, reading no pixels."""
    if isinstance(x, (torch.Tensor, np.ndarray)):  # views (np.memmap included)
        return x[start:stop]
    return BatchView(x, start, stop)


def read_region(array: Any, index: Index) -> torch.Tensor:
    """``array[index]`` as a new, contiguous CPU tensor that shares no memory with ``array``.

    A region of an ``np.memmap`` is read from its file with one ``pread`` per row, not
    through the mapping: reading through the mapping would leave every page it touched
    (and the kernel's fault-around neighbours, whole rows of the image) resident in this
    process, so a memory-mapped image read tile by tile would end up resident whole."""
    part = array[index]
    out = read_memmap(part) if isinstance(part, np.memmap) else None
    if out is None:
        out = np.asarray(part)
        native = out.dtype.newbyteorder("=")
        if not (out.flags.c_contiguous and out.flags.owndata and out.flags.writeable and out.dtype == native):
            out = np.array(out, dtype=native, order="C", copy=True)
    return torch.from_numpy(out)


def read_memmap(view: np.memmap) -> np.ndarray | None:
    """The pixels of a memmap view read from its file (``os.preadv``, one call per row of
    its last axis), or None where that is not possible or not coherent with the mapping:
    copy-on-write memmaps (``mode='c'``, whose changes are not in the file), anonymous
    maps, a non-positive last stride, or a platform without ``preadv``."""
    mm = getattr(view, "_mmap", None)
    stride = view.strides[-1] if view.ndim else 0
    if mm is None or view.mode == "c" or not view.filename or stride <= 0 or not hasattr(os, "preadv"):
        return None
    out = np.empty(view.shape, dtype=view.dtype)
    if view.size == 0:
        return out
    mapped_at = view.offset - view.offset % mmap.ALLOCATIONGRANULARITY  # file offset of the mapping
    base = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
    first = view.__array_interface__["data"][0] - base + mapped_at
    offsets = np.full((), first, dtype=np.int64)
    for n, s in zip(view.shape[:-1], view.strides[:-1]):
        offsets = offsets[..., None] + np.arange(n, dtype=np.int64) * s
    count, span = view.shape[-1], (view.shape[-1] - 1) * stride + view.itemsize
    rows = out.reshape(-1, count)
    buffer = np.empty(span, dtype=np.uint8) if stride != view.itemsize else None
    with open(view.filename, "rb", buffering=0) as f:
        for row, offset in zip(rows, offsets.reshape(-1).tolist()):
            target = row.view(np.uint8) if buffer is None else buffer
            if os.preadv(f.fileno(), [target], offset) != span:
                return None  # the file is shorter than the map says: let numpy report it
            if buffer is not None:
                row[...] = np.ndarray((count,), view.dtype, buffer, 0, (stride,))
    return out if out.dtype.isnative else out.astype(out.dtype.newbyteorder("="))
