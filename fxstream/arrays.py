"""Array-likes as images: detection, lazy batch slices, and reading a region into a tensor.

An *array-like* is anything with ``.shape``, ``.dtype`` and numpy-style basic slicing
(ints, slices, ``...``) that returns a numpy array, or something ``np.asarray`` turns
into one: numpy arrays and memmaps, zarr arrays, dask arrays, :class:`fxstream.slides.SlideArray`.
fxstream never reads more of it than the region of the tile it is computing.
"""

from __future__ import annotations

import mmap
from typing import Any

import numpy as np
import torch

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
    return torch.from_numpy(np.empty(0, dtype=np.dtype(dtype).newbyteorder("="))).dtype


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

    For a read-only or shared ``np.memmap``, the pages the read touched are released
    from this process afterwards (they stay in the OS page cache), so reading a whole
    memory-mapped image tile by tile does not make it resident in the process."""
    part = array[index]
    out = np.asarray(part)
    native = out.dtype.newbyteorder("=")
    if not (out.flags.c_contiguous and out.flags.owndata and out.flags.writeable and out.dtype == native):
        out = np.array(out, dtype=native, order="C", copy=True)
    if isinstance(part, np.memmap):
        release_pages(part)
    return torch.from_numpy(out)


def release_pages(view: np.memmap) -> None:
    """``madvise(MADV_DONTNEED)`` over the mapped pages that ``view`` spans, for memmaps
    opened read-only (``'r'``) or shared (``'r+'``, ``'w+'``), where the file keeps the
    data. Copy-on-write memmaps (``'c'``) are left alone: dropping their pages would
    drop the user's private changes."""
    mm = getattr(view, "_mmap", None)
    if mm is None or getattr(view, "mode", "c") == "c" or not hasattr(mm, "madvise") or view.size == 0:
        return
    base = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
    lo = hi = view.__array_interface__["data"][0]
    for n, stride in zip(view.shape, view.strides):
        (lo, hi) = (lo + stride * (n - 1), hi) if stride < 0 else (lo, hi + stride * (n - 1))
    page = mmap.PAGESIZE
    start = (lo - base) // page * page
    stop = min(-(-(hi + view.itemsize - base) // page) * page, len(mm))
    if stop > start:
        mm.madvise(mmap.MADV_DONTNEED, start, stop - start)
