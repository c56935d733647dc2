"""Image files that never sit whole in memory: one level of a slide as a lazy (1, C, H, W) array.

:func:`open_image` opens tiled and pyramidal TIFF, BigTIFF, OME-TIFF and SVS files through
tifffile's zarr store (``pip install tifffile zarr imagecodecs``, or the ``slides``
extra), and the formats OpenSlide reads
when ``openslide-python`` and ``openslide-bin`` are installed. The result,
:class:`SlideArray`, is an array-like: pass it wherever fxstream takes an image tensor,
and each tile's region is read from the file when the schedule needs it::

    slide = fxstream.open_image("case_17.svs", level=0)       # (1, 3, H, W), nothing read yet
    logits = smodel(slide)                                    # reads one tile region at a time

Reads never write to the file. The file's channel-last layout (``YXS``) is transposed
per read, never as a whole. On a tiled file, reads are aligned to the file's tile grid:
decoded file tiles are kept in a small LRU cache (``cache_bytes``), so the halo that
neighbouring fxstream tiles share is decoded once. A :class:`SlideArray` pickles as its
handle (path, level, options), not its pixels, so :class:`SlideDataset` works with
``DataLoader`` workers; :func:`collate` keeps the images lazy.
"""

from __future__ import annotations

import collections
import operator
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import ArgumentError, FxStreamError, ImageFileError, LevelError, user_error
from .arrays import normalize_index

DEFAULT_CACHE_BYTES = 16 << 20  # per open slide: a few neighbouring tiles' halos, not the image
_BACKENDS = ("auto", "tifffile", "openslide")


def open_image(
    path: str | os.PathLike,
    level: int = 0,
    *,
    backend: str = "auto",
    channels: Iterable[int] | None = None,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
) -> SlideArray:
    """Level ``level`` of the image file ``path`` as a lazy ``(1, C, H, W)`` array-like.

    Args:
        path: a TIFF / BigTIFF / OME-TIFF / SVS file (tifffile), or any file OpenSlide reads.
        level: the pyramid level, 0 being full resolution.
        backend: ``"tifffile"``, ``"openslide"``, or ``"auto"`` (tifffile first, then
            OpenSlide if it is installed).
        channels: the file channels to keep, in order (e.g. ``range(3)`` drops alpha);
            default all.
        cache_bytes: the budget of decoded file tiles kept for reuse by neighbouring
            reads (0: no cache).

    Raises:
        ImageFileError: the file is missing (or a directory), not an image any installed
            reader knows, or not one 2D image (several Z planes or time points); on a read,
            a truncated or corrupt file (the message names the level and the region).
        LevelError: the file has no level ``level``.
        ArgumentError: ``level`` is not an int, or ``backend`` is unknown.
    """
    return SlideArray(path, level, backend=backend, channels=channels, cache_bytes=cache_bytes)


class SlideArray:
    """One level of an image file as a ``(1, C, H, W)`` array-like (``.shape``, ``.dtype``,
    numpy basic slicing returning a numpy array). Nothing is read until it is sliced.

    Attributes: ``path``, ``level``, ``backend`` (the reader used), ``levels`` (height,
    width of every level), ``file_tile`` (height, width of the file's tiles, or None).
    ``np.asarray(slide)`` reads the whole level: slice it instead.
    """

    ndim = 4

    def __init__(
        self,
        path: str | os.PathLike,
        level: int = 0,
        *,
        backend: str = "auto",
        channels: Iterable[int] | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ):
        if backend not in _BACKENDS:
            raise user_error(ArgumentError, f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.path = os.fspath(path)
        self.level = _level(level)
        self.cache_bytes = int(cache_bytes)
        self._requested_backend = backend
        self._channels = None if channels is None else tuple(int(c) for c in channels)
        self._reader: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        reader = self._open()
        self.backend = reader.name
        self.levels = reader.levels
        self.file_tile = reader.file_tile
        self.dtype = reader.dtype
        self._file_channels = reader.channels
        keep = self._keep()
        self.shape = (1, len(keep), reader.height, reader.width)

    def _keep(self) -> tuple[int, ...]:
        keep = tuple(range(self._file_channels)) if self._channels is None else self._channels
        bad = [c for c in keep if not 0 <= c < self._file_channels]
        if bad or not keep:
            raise ImageFileError(
                f"{self.path}: channels={self._channels} selects no valid channels of the file's "
                f"{self._file_channels} (indices 0..{self._file_channels - 1})",
                path=self.path,
            )
        return keep

    def _open(self):
        """The reader, opened in this process (a forked or unpickled copy reopens the file,
        which must still hold the image this handle was opened on)."""
        if self._reader is None or self._pid != os.getpid():
            reader = _open_reader(self.path, self.level, self._requested_backend, self.cache_bytes)
            if hasattr(self, "shape"):  # a reopening
                self._check_unchanged(reader)
            self._reader, self._pid = reader, os.getpid()
        return self._reader

    def _check_unchanged(self, reader) -> None:
        was = (self.levels, np.dtype(self.dtype), self._file_channels)
        now = (reader.levels, np.dtype(reader.dtype), reader.channels)
        if now == was:
            return
        reader.close()
        raise user_error(
            ImageFileError,
            f"{self.path} changed since it was opened: it had {_describe(*was)}; it now has {_describe(*now)}",
            fix=f"open it again: fxstream.open_image({self.path!r}, level={self.level})",
            path=self.path,
        )

    def __len__(self) -> int:
        return 1

    def __getitem__(self, key: Any) -> np.ndarray:
        b, c, y, x = normalize_index(key, self.shape)
        (y0, y1), (x0, x1) = _span(y), _span(x)
        with self._lock:  # one read at a time: the reader's file handle and cache are shared
            block = self._read(y0, y1, x0, x1)  # (C_file, h, w), contiguous
        block = block[np.asarray(self._keep())[c]]
        step_y = slice(None, None, y.step) if isinstance(y, slice) else 0
        step_x = slice(None, None, x.step) if isinstance(x, slice) else 0
        block = block[..., step_y, step_x]
        return np.ascontiguousarray(block[None][b] if isinstance(b, slice) else block)

    def _read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The reader's block, its failures (a truncated file, a corrupt tile) as ImageFileError."""
        try:
            return self._open().read(y0, y1, x0, x1)
        except (FxStreamError, MemoryError):
            raise
        except Exception as exc:  # the codec's or tifffile's own error, without the file name
            raise ImageFileError(
                f"{self.path}: reading level {self.level}, rows [{y0}, {y1}), columns [{x0}, {x1}) failed: "
                f"{type(exc).__name__}: {exc}. The file may be truncated or corrupt; fix: check it "
                f"(e.g. tifffile.imread(path)) or write it again",
                path=self.path,
            ) from None

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[...]
        return out if dtype is None else out.astype(dtype)

    def close(self) -> None:
        """Close the file (a later read reopens it)."""
        with self._lock:
            if self._reader is not None:
                self._reader.close()
            self._reader = None

    def __enter__(self) -> SlideArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_reader=None, _pid=-1, _lock=None)  # a handle, not pixels or file objects
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SlideArray({self.path!r}, level={self.level}, shape={self.shape}, dtype={self.dtype}, {self.backend})"


def _describe(levels: tuple, dtype: np.dtype, channels: int) -> str:
    return f"{channels} channels of {dtype}, levels " + ", ".join(f"{h}x{w}" for h, w in levels)


def _span(index: int | slice) -> tuple[int, int]:
    """The contiguous range ``[lo, hi)`` a resolved int or slice reads."""
    if isinstance(index, int):
        return index, index + 1
    n = len(range(index.start, index.stop, index.step))
    if n == 0:
        return 0, 0
    first, last = index.start, index.start + (n - 1) * index.step
    lo, hi = min(first, last), max(first, last) + 1
    return lo, hi


# --- readers: (C, h, w) blocks of one level -------------------------------------------------


def _level(level: Any) -> int:
    try:
        return operator.index(level)  # ints and numpy integers, not 1.7
    except TypeError:
        pass
    raise user_error(
        ArgumentError,
        f"level must be an int (0 is full resolution), got {level!r}",
        fix="e.g. open_image(path, level=1)",
    )


def _open_reader(path: str, level: int, backend: str, cache_bytes: int):
    if os.path.isdir(path):
        raise ImageFileError(f"{path} is a directory, not an image file; fix: pass one file in it", path=path)
    if not os.path.isfile(path):
        raise ImageFileError(f"{path}: no such file", path=path)
    failures = []
    openers: list[tuple[str, Callable]] = [("tifffile", _TiffReader), ("openslide", _OpenSlideReader)]
    for name, opener in openers:
        if backend not in ("auto", name):
            continue
        try:
            return opener(path, level, cache_bytes)
        except _NotMine as reason:
            failures.append(f"{name}: {reason}")
        except (FxStreamError, MemoryError):
            raise
        except Exception as exc:  # the reader knows the format, but not this file's contents
            raise ImageFileError(
                f"{path}: opening level {level} ({name}) failed: {type(exc).__name__}: {exc}. The file may be "
                f"truncated or corrupt; fix: check it (e.g. tifffile.imread(path)) or write it again",
                path=path,
            ) from None
    raise ImageFileError(
        f"{path} is not an image fxstream can read ({'; '.join(failures)}). Supported: tiled or pyramidal "
        f"TIFF, BigTIFF, OME-TIFF and SVS (pip install tifffile zarr imagecodecs), and what OpenSlide reads "
        f"(pip install openslide-python openslide-bin).",
        path=path,
    )


class _NotMine(Exception):
    """A reader does not recognise the file (the next reader may)."""


def _level_error(path: str, level: int, levels: tuple) -> LevelError:
    listed = ", ".join(f"{i}: {h}x{w}" for i, (h, w) in enumerate(levels))
    return LevelError(
        f"{path} has no level {level}; its {len(levels)} levels (height x width) are {listed}. "
        f"Fix: open_image(path, level=...) with a level below {len(levels)}.",
        path=path,
        level=level,
        levels=levels,
    )


class _TiffReader:
    """A TIFF series level through tifffile's zarr store, read-only."""

    name = "tifffile"

    def __init__(self, path: str, level: int, cache_bytes: int):
        try:
            import tifffile
            import zarr
        except ImportError as e:
            raise _NotMine(f"not installed ({e.name}); pip install tifffile zarr imagecodecs") from None
        try:
            self._file = tifffile.TiffFile(path, mode="rb")
        except (tifffile.TiffFileError, ValueError) as e:
            raise _NotMine(f"not a TIFF file ({e})") from None
        try:
            self._setup(path, level, cache_bytes, zarr)
        except BaseException:
            self._file.close()
            raise

    def _setup(self, path: str, level: int, cache_bytes: int, zarr) -> None:
        if not self._file.series:
            raise _NotMine("no image series in the file")
        series = self._file.series[0]
        layout = [_Layout(path, lv.axes, lv.shape) for lv in series.levels]
        self.levels = tuple((lay.height, lay.width) for lay in layout)
        if not 0 <= level < len(layout):
            raise _level_error(path, level, self.levels)
        self.layout = layout[level]
        self.height, self.width, self.channels = self.layout.height, self.layout.width, self.layout.channels
        self._store = series.aszarr(level=level)
        self._array = zarr.open(self._store, mode="r")
        self.dtype = np.dtype(self._array.dtype)
        chunks = self._array.chunks
        page = series.levels[level].keyframe
        self.file_tile = (chunks[self.layout.y], chunks[self.layout.x]) if page.is_tiled else None
        chunk_bytes = int(np.prod(chunks)) * self.dtype.itemsize
        cached = self.file_tile is not None and chunk_bytes * 16 <= cache_bytes  # aligned reads pay off
        self._cache = _ChunkCache(cache_bytes) if cached else None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self._cache is None or y1 <= y0 or x1 <= x0:
            return self._read_box(y0, y1, x0, x1)
        return self._read_aligned(y0, y1, x0, x1)

    def _read_box(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Rows ``[y0, y1)`` and columns ``[x0, x1)`` as a (C, h, w) array."""
        return self.layout.to_chw(self._array[self.layout.index(y0, y1, x0, x1)])

    def _read_aligned(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The box assembled from whole file tiles, decoding only those not cached."""
        th, tw = self.file_tile
        grid = [(i, j) for i in range(y0 // th, (y1 - 1) // th + 1) for j in range(x0 // tw, (x1 - 1) // tw + 1)]
        pieces = {key: self._cache.get(key) for key in grid}
        missing = [key for key, piece in pieces.items() if piece is None]
        if missing:
            i0, i1 = min(i for i, _ in missing), max(i for i, _ in missing) + 1
            j0, j1 = min(j for _, j in missing), max(j for _, j in missing) + 1
            box = self._read_box(i0 * th, min(i1 * th, self.height), j0 * tw, min(j1 * tw, self.width))
            for i, j in missing:
                piece = box[:, (i - i0) * th : (i - i0 + 1) * th, (j - j0) * tw : (j - j0 + 1) * tw].copy()
                pieces[i, j] = piece
                self._cache.put((i, j), piece)
        out = np.empty((self.channels, y1 - y0, x1 - x0), dtype=self.dtype)
        for (i, j), piece in pieces.items():
            ty, tx = i * th, j * tw
            ya, yb = max(y0, ty), min(y1, ty + piece.shape[1])
            xa, xb = max(x0, tx), min(x1, tx + piece.shape[2])
            out[:, ya - y0 : yb - y0, xa - x0 : xb - x0] = piece[:, ya - ty : yb - ty, xa - tx : xb - tx]
        return out

    def close(self) -> None:
        self._store.close()
        self._file.close()


class _Layout:
    """Where Y, X and the channels sit among a TIFF level's axes (e.g. ``YXS``, ``CYX``)."""

    def __init__(self, path: str, axes: str, shape: Sequence[int]):
        sizes = dict(zip(axes, shape))
        if "Y" not in sizes or "X" not in sizes:
            raise ImageFileError(f"{path}: the image has axes {axes!r}, with no Y and X axes", path=path)
        colour = [a for a in axes if a in "SC" and sizes[a] > 1]
        extra = {a: n for a, n in sizes.items() if a not in "YXSC" and n > 1}
        if len(colour) > 1 or extra:
            raise ImageFileError(
                f"{path}: the image has axes {axes!r} of shape {tuple(shape)}; fxstream reads one 2D image "
                f"(Y, X and one channel axis). Fix: save one plane per file, or open it with tifffile and "
                f"pass a numpy/zarr view of one plane.",
                path=path,
            )
        self.axes = axes
        self.y, self.x = axes.index("Y"), axes.index("X")
        self.c = axes.index(colour[0]) if colour else None
        self.height, self.width = sizes["Y"], sizes["X"]
        self.channels = sizes[colour[0]] if colour else 1

    def index(self, y0: int, y1: int, x0: int, x1: int) -> tuple:
        """The file-order index of rows ``[y0, y1)``, columns ``[x0, x1)``, all channels."""
        index: list = [0] * len(self.axes)
        index[self.y], index[self.x] = slice(y0, y1), slice(x0, x1)
        if self.c is not None:
            index[self.c] = slice(None)
        return tuple(index)

    def to_chw(self, block: np.ndarray) -> np.ndarray:
        """A block read with :meth:`index` as a contiguous (C, h, w) array."""
        kept = sorted(a for a in (self.c, self.y, self.x) if a is not None)
        order = [kept.index(a) for a in (self.c, self.y, self.x) if a is not None]
        block = np.transpose(block, order)
        return np.ascontiguousarray(block if self.c is not None else block[None])


class _ChunkCache:
    """Decoded file tiles, least recently used dropped first, within a byte budget."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._items: collections.OrderedDict = collections.OrderedDict()

    def get(self, key) -> np.ndarray | None:
        piece = self._items.get(key)
        if piece is not None:
            self._items.move_to_end(key)
        return piece

    def put(self, key, piece: np.ndarray) -> None:
        self._items[key] = piece
        self.used += piece.nbytes
        while self.used > self.budget and self._items:
            _, dropped = self._items.popitem(last=False)
            self.used -= dropped.nbytes


class _OpenSlideReader:
    """A slide level through OpenSlide (RGB; transparent background reads as 0).

    OpenSlide addresses regions in level-0 coordinates: at a level whose downsample is
    not an integer, OpenSlide resamples, so pixels may differ slightly from the level's
    stored pixels (tifffile reads them exactly)."""

    name = "openslide"

    def __init__(self, path: str, level: int, cache_bytes: int):
        try:
            import openslide
        except ImportError:
            raise _NotMine("not installed (pip install openslide-python openslide-bin)") from None
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideError as e:
            raise _NotMine(f"unsupported ({e})") from None
        dims = self._slide.level_dimensions
        self.levels = tuple((h, w) for w, h in dims)
        if not 0 <= level < len(dims):
            self._slide.close()
            raise _level_error(path, level, self.levels)
        self.level = level
        self.height, self.width = self.levels[level]
        self.downsample = self._slide.level_downsamples[level]
        self.channels, self.dtype = 3, np.dtype(np.uint8)
        props = self._slide.properties
        tile = (props.get(f"openslide.level[{level}].tile-height"), props.get(f"openslide.level[{level}].tile-width"))
        self.file_tile = tuple(int(t) for t in tile) if all(tile) else None

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if y1 <= y0 or x1 <= x0:
            return np.empty((3, max(y1 - y0, 0), max(x1 - x0, 0)), dtype=np.uint8)
        origin = (round(x0 * self.downsample), round(y0 * self.downsample))
        rgba = np.asarray(self._slide.read_region(origin, self.level, (x1 - x0, y1 - y0)))
        return np.ascontiguousarray(rgba[..., :3].transpose(2, 0, 1))

    def close(self) -> None:
        self._slide.close()


# --- datasets ------------------------------------------------------------------------------


class SlideDataset(torch.utils.data.Dataset):
    """``(path, label)`` pairs as ``(SlideArray, label)`` samples. Opening reads only the
    file's header; the samples pickle as handles, so ``DataLoader`` workers send paths,
    not pixels. Use ``collate_fn=fxstream.slides.collate``."""

    def __init__(self, items: Sequence[tuple[str | os.PathLike, Any]], level: int = 0, **options: Any):
        self.items = [(os.fspath(path), label) for path, label in items]
        self.level = level
        self.options = options

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[SlideArray, Any]:
        path, label = self.items[index]
        return open_image(path, self.level, **self.options), label


def collate(batch: Sequence[tuple[Any, Any]]) -> tuple[list[Any], Any]:
    """``(images, labels)``: the images as a list (lazy, of any sizes; each one micro-batch
    of ``fxstream.serial_backward``), the labels collated by torch's default collate."""
    images = [image for image, _ in batch]
    labels = torch.utils.data.default_collate([label for _, label in batch])
    return images, labels
