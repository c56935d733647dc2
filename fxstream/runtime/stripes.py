"""Where the carry schedule keeps its stripes between the forward and the backward pass.

A *stripe* is the part of a tile's cell that later tiles read (``ShapePlan`` tiles'
``carry`` pieces). The forward pass stores every stripe as it is made; the backward pass
reads each one again when it recomputes its reader. :class:`Stripes` is the bookkeeping
of a tiling (who stores, who reads, the last reader in each pass); a *store* holds the
tensors of one pass through a small interface that the executor
(:mod:`fxstream.runtime.executor`) calls:

* ``put(key, part)``: a tile stores a stripe (``part`` is a view of its fresh cell);
* ``get(key)``: a tile reads a stripe, on the compute device;
* ``prefetch(position)``: the backward pass will run tile ``position`` next;
* ``release(position, backward)``: tile ``position`` has run: drop what no later tile of
  this pass reads.

Two stores, one per placement of ``Schedule.stripes`` (:mod:`fxstream.planning.schedule`):

* :class:`DeviceStripes` keeps every stripe that the backward pass will read on the
  compute device (``kept``: the positions whose stripes it keeps), and drops the others
  after their last forward reader: a rolling window of about one row of tiles.
* :class:`HostStripes` keeps only that rolling window on the device, and a copy of every
  kept stripe in host memory. On CUDA the copies go to pinned memory on a side stream
  (device to host as the stripe is made; host to device for the next tile of the backward
  pass while the current one computes). On a CPU compute device the copies are clones: the
  same bookkeeping, exercised by the float64 tests.

Banded carry needs no store of its own: its backward pass fills a :class:`DeviceStripes`
for one band at a time (see the executor).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

Key = tuple  # (node name, global box): one stored stripe


@dataclass
class Stripes:
    """The stripe bookkeeping of a carry ShapePlan, derived from its tiles.

    ``saves[p]``: node -> boxes of its cell that tile ``p`` stores for later tiles;
    ``reads[p]``: the keys tile ``p`` reads; ``source[key]``: the tile that stores ``key``;
    ``last_forward[key]``: the last tile that reads ``key`` in the forward pass;
    ``last_backward[key]``: the first tile that reads it (the last one back-propagated)."""

    saves: list
    reads: list
    source: dict
    last_forward: dict
    last_backward: dict

    @staticmethod
    def of(shape_plan) -> Stripes:
        tiles = shape_plan.tiles
        saves: list = [{} for _ in tiles]
        reads: list = [[] for _ in tiles]
        source: dict = {}
        last_forward: dict = {}
        last_backward: dict = {}
        for position, tile in enumerate(tiles):
            for name, _, pieces, _ in tile.carry:
                for owner, box in pieces:
                    if owner < 0:
                        continue
                    key = (name, box)
                    reads[position].append(key)
                    if key not in source:
                        saves[owner].setdefault(name, []).append(box)
                        source[key] = owner
                        last_backward[key] = position
                    last_forward[key] = position
        return Stripes(saves, reads, source, last_forward, last_backward)


def store(placement: str, stripes: Stripes, kept: range | None, device: torch.device) -> DeviceStripes:
    """The store of one pass for ``placement`` ('device', 'host' or 'banded'): ``kept`` holds
    the positions whose stripes the backward pass reads from it (None: none, an inference
    pass)."""
    if placement == "host":
        return HostStripes(stripes, kept, device)
    return DeviceStripes(stripes, kept)


class DeviceStripes:
    """The stripes on the compute device: kept ones until their last backward reader, the
    others until their last forward reader."""

    placement = "device"

    def __init__(self, stripes: Stripes, kept: range | None):
        self.stripes = stripes
        self.kept = kept
        self.live: dict = {}  # key -> the stripe on the compute device

    def __len__(self) -> int:
        return len(self.live)

    def kept_for_backward(self, key: Key) -> bool:
        return self.kept is not None and self.stripes.source[key] in self.kept

    def put(self, key: Key, part: torch.Tensor) -> None:
        self.live[key] = part.detach().clone()

    def get(self, key: Key) -> torch.Tensor:
        return self.live[key]

    def prefetch(self, position: int) -> None:
        """Nothing to fetch: every kept stripe is on the device."""

    def release(self, position: int, backward: bool) -> None:
        last = self.stripes.last_backward if backward else self.stripes.last_forward
        for key in self.stripes.reads[position]:
            if last.get(key) == position and (backward or not self.kept_for_backward(key)):
                self.live.pop(key, None)


class HostStripes(DeviceStripes):
    """A rolling window of stripes on the compute device, and every kept stripe in host
    memory, copied back to the device one tile ahead of the backward pass."""

    placement = "host"

    def __init__(self, stripes: Stripes, kept: range | None, device: torch.device):
        super().__init__(stripes, kept)
        self.copies = _Copies(device)
        self.host: dict = {}  # key -> its copy in host memory
        self.fetched: dict = {}  # key -> its copy on the device for the backward pass (with a ready event)
        self.ahead: list = []  # the keys of the tile prefetched last

    def __len__(self) -> int:
        return len(self.live) + len(self.host)

    def put(self, key: Key, part: torch.Tensor) -> None:
        stripe = part.detach().clone()
        self.live[key] = stripe  # the forward pass's window
        if self.kept_for_backward(key):
            self.host[key] = self.copies.to_host(stripe)

    def get(self, key: Key) -> torch.Tensor:
        if key in self.live:
            return self.live[key]
        if key not in self.fetched:  # not prefetched (the first tile of a pass)
            self.fetched[key] = self.copies.to_device(self.host[key])
        return self.copies.ready(self.fetched[key])

    def prefetch(self, position: int) -> None:
        self.ahead = self.stripes.reads[position]
        for key in self.ahead:
            if key not in self.live and key not in self.fetched and key in self.host:
                self.fetched[key] = self.copies.to_device(self.host[key])

    def release(self, position: int, backward: bool) -> None:
        last = self.stripes.last_backward if backward else self.stripes.last_forward
        ahead = set(self.ahead)
        for key in self.stripes.reads[position]:
            if last.get(key) == position:
                self.live.pop(key, None)  # forward: the window moves on; the host copy stays
                if backward:
                    self.host.pop(key, None)
            if backward and key not in ahead:  # fetched again if an earlier tile reads it too
                self.fetched.pop(key, None)


SLAB = 64 << 20  # bytes of one pinned host buffer that small stripes are cut from
ALIGN = 256


class _Copies:
    """Copies of stripes between the compute device and host memory: on CUDA, pinned host
    memory and one side stream (so device-to-host and host-to-device copies stay in order);
    on a CPU compute device, clones.

    Pinned memory is slow to allocate and torch's pinned allocator rounds each block up to
    a power of two, so small stripes are cut from pinned slabs of ``SLAB`` bytes, in the
    order they are stored (a slab is freed when the last stripe cut from it is dropped)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slab: torch.Tensor | None = None
        self.used = 0

    def pinned(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """An empty pinned host tensor, cut from the current slab when small."""
        nbytes = shape.numel() * dtype.itemsize
        if nbytes > SLAB // 4:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if self.slab is None or self.used + nbytes > SLAB:
            self.slab, self.used = torch.empty(SLAB, dtype=torch.uint8, pin_memory=True), 0
        part = self.slab[self.used : self.used + nbytes]
        self.used += -(-nbytes // ALIGN) * ALIGN
        return part.view(dtype).view(shape)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        if not self.cuda:
            return t.clone()
        host = self.pinned(t.shape, t.dtype)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is made on the compute stream
        with torch.cuda.stream(self.stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self.stream)  # its memory is not reused before the copy has read it
        return host

    def to_device(self, host: torch.Tensor):
        if not self.cuda:
            return host.clone()
        with torch.cuda.stream(self.stream):
            t = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return t, done

    def ready(self, fetched) -> torch.Tensor:
        """A fetched copy, usable on the compute stream."""
        if not self.cuda:
            return fetched
        t, done = fetched
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        t.record_stream(compute)  # allocated on the side stream, used on the compute stream
        return t
