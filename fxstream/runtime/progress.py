"""Progress over tiles (an optional tqdm bar) and a per-step summary of the streaming work."""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class StreamStats:
    """What the streamed trunk did since the last :meth:`reset` (``serial_backward``
    resets it at the start of every step, so after a step it describes that step).

    ``peak_memory`` is the CUDA peak allocated memory on the compute device since the
    reset (``None`` on CPU); ``host_peak_rss`` is the process's peak resident memory
    (the operating system's figure, never reset).
    """

    passes: int = 0  # streamed forward calls
    forward_tiles: int = 0
    backward_tiles: int = 0
    forward_s: float = 0.0
    backward_s: float = 0.0
    rebuild_tiles: int = 0  # banded carry (or a second backward pass): no-grad tiles that rebuild stripes
    rebuild_s: float = 0.0
    peak_memory: int | None = None
    host_peak_rss: int = 0

    def reset(self, device: torch.device | None = None) -> None:
        self.__init__()
        if device is not None and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def record(self, phase: str, tiles: int, seconds: float, device: torch.device) -> None:
        if phase == "forward":
            self.passes += 1
            self.forward_tiles += tiles
            self.forward_s += seconds
        elif phase == "rebuild":
            self.rebuild_tiles += tiles
            self.rebuild_s += seconds
        else:
            self.backward_tiles += tiles
            self.backward_s += seconds
        if device.type == "cuda":
            self.peak_memory = max(self.peak_memory or 0, torch.cuda.max_memory_allocated(device))
        scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
        self.host_peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def __str__(self) -> str:
        memory = f"peak GPU memory {self.peak_memory / 2**30:.2f} GiB" if self.peak_memory is not None else ""
        host = f"host peak RSS {self.host_peak_rss / 2**30:.2f} GiB"
        rebuild = ""
        if self.rebuild_tiles:
            rebuild = f"{self.rebuild_tiles} tiles rebuilding stripes in {self.rebuild_s:.2f} s, "
        return (
            f"{self.passes} streamed passes: {self.forward_tiles} forward tiles in {self.forward_s:.2f} s, "
            f"{rebuild}{self.backward_tiles} backward tiles in {self.backward_s:.2f} s; "
            + ", ".join(m for m in (memory, host) if m)
        )


_BARS = threading.local()  # the bars open in this thread (see Timer)


def _open_bars() -> list:
    if not hasattr(_BARS, "open"):
        _BARS.open = []
    return _BARS.open


def tiles_progress(tiles: Iterable, total: int, enabled: bool, desc: str) -> Iterator:
    """``tiles``, wrapped in a tqdm bar when ``enabled`` (tqdm is an optional dependency:
    ``pip install 'fxstream[progress]'``). A pass that fails closes its bar (see
    :class:`Timer`), so the error is not printed after the bar on its line."""
    if not enabled:
        yield from tiles
        return
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress=True needs tqdm: pip install tqdm (or pip install 'fxstream[progress]')") from exc
    with tqdm(total=total, desc=desc, unit="tile", leave=False) as bar:
        bars = _open_bars()
        bars.append(bar)
        try:
            for item in tiles:
                yield item
                bar.update(1)
        finally:
            if bar in bars:
                bars.remove(bar)


class Timer:
    """Wall time of a block (a streamed pass); waits for the device's queued work on CUDA so
    the figure is real. A block that fails closes the progress bars opened inside it: the
    bar's generator is only closed when the error (which references it) is gone, after the
    error has been printed behind the bar."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.bars = len(_open_bars())
        return self

    def __exit__(self, kind, *exc) -> None:
        if kind is not None:
            bars = _open_bars()
            while len(bars) > self.bars:
                bars.pop().close()
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.start
