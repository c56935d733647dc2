"""Memory truth: the tensor peak of a callable, measured allocator-independently.

The predictive memory model (:mod:`fxstream.memory.model`) predicts the bytes of live *tensors*
at the peak of a step. RSS is no measure of that (glibc keeps freed blocks; the first
step's RSS can read several times the tensor peak), so this module measures tensors:

* **CPU**: ``torch.profiler.profile(profile_memory=True)`` records every CPU allocation
  and free as an ``Allocation`` event (``extra_fields.alloc_size``, negative on a free).
  Their running sum in time order is the live tensor bytes; its maximum is the peak. This
  is the CPU analogue of CUDA's ``max_memory_allocated``.
* **CUDA**: ``torch.cuda.reset_peak_memory_stats`` before the call,
  ``max_memory_allocated() - memory_allocated()`` (before) after it.

**What is counted.** Only what is allocated while the callable runs is seen, so tensors
that exist before the call (the model's parameters and buffers, the input image) are not
in :attr:`Truth.peak`. The prediction (``memory.streamed.training.bytes``) counts the
parameters, buffers and the input as "resident", so :attr:`Truth.total` adds the bytes of
the ``resident`` tensors the caller names (each storage once) to the measured peak::

    total = resident bytes (existing before the call) + peak of the bytes allocated during it

Compare ``total`` with the prediction's total, or ``peak`` with the prediction minus its
``parameters`` and ``input`` parts (the same comparison). Parameter gradients must not
exist before the call (``zero_grad(set_to_none=True)``): the model counts them as
allocated in the step. On CPU the profiler does not see the free of a tensor allocated
before the call (it does not know its size), so such a tensor stays counted, as the
model's "resident" does; on CUDA its free lowers the measured peak.

**Phases.** Code under measurement calls :func:`mark` (``mark("backward tile 3")``): a
phase lasts from its mark to the next one. On CPU a mark is a zero-length profiler range
``memtruth::<label>``, and every allocation belongs to the last mark before it; on CUDA a
mark reads ``max_memory_allocated`` and resets it. :attr:`Truth.phases` gives each phase's
peak and the bytes live when it started. Outside a measurement :func:`mark` does nothing.

**Owners** (CPU only). :attr:`Truth.live_at_peak` lists the allocations alive at the peak
with the operator stack that made them (``aten::cat``, ``aten::zeros_like``, the
record_function ranges around them) and the phase they were made in.

Example::

    net.zero_grad(set_to_none=True)
    truth = measure(lambda: loss_fn(smodel(x)).backward(), resident=[*net.parameters(), *net.buffers(), x])
    truth.total  # compare with memory.streamed.training.bytes
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

PREFIX = "memtruth::"
START = "start"

_active: list = []  # the measurement in progress (at most one)


@dataclass(frozen=True)
class Allocation:
    """One allocation alive at the peak: its bytes, the operator stack that made it
    (outermost first) and the phase it was made in."""

    bytes: int
    stack: tuple[str, ...]
    phase: str


@dataclass(frozen=True)
class Phase:
    """``peak``: the most bytes live (above the start of the call) while the phase ran;
    ``start``: the bytes live when it began (CPU only; -1 on CUDA)."""

    peak: int
    start: int


@dataclass
class Truth:
    """The result of :func:`measure` (see the module docstring)."""

    peak: int  # bytes above the start of the call, at the peak
    resident: int  # bytes of the tensors that exist before the call (named by the caller)
    phase: str  # the phase the peak happened in
    phases: dict = field(default_factory=dict)  # label -> Phase, in order of first mark
    live_at_peak: list = field(default_factory=list)  # Allocation, largest first (CPU)

    @property
    def total(self) -> int:
        """The peak with the resident tensors: what ``memory.*.bytes`` predicts."""
        return self.resident + self.peak

    def by_owner(self, classify: Callable[[Allocation], str]) -> dict:
        """Bytes alive at the peak, summed by ``classify(allocation)``, largest first."""
        sums: dict = {}
        for a in self.live_at_peak:
            key = classify(a)
            sums[key] = sums.get(key, 0) + a.bytes
        return dict(sorted(sums.items(), key=lambda kv: -kv[1]))


def resident_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the storages of ``tensors``, each storage once (views share one)."""
    seen: set = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in seen and storage.nbytes():
            seen.add(key)
            total += storage.nbytes()
    return total


def mark(label: str) -> None:
    """Start the phase ``label`` of the measurement in progress (nothing outside one)."""
    if _active:
        _active[-1].mark(label)


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Mark ``label`` for the duration of the block, then go back to the enclosing phase."""
    if not _active:
        yield
        return
    recorder = _active[-1]
    outer = recorder.current
    recorder.mark(label)
    try:
        yield
    finally:
        recorder.mark(outer)


def measure(
    fn: Callable[[], object], resident: Iterable[torch.Tensor] = (), device: torch.device | str | None = None
) -> Truth:
    """Run ``fn()`` once and measure its tensor peak on ``device`` (default: CUDA when
    ``resident`` holds a CUDA tensor, else CPU). ``resident``: the tensors that exist
    before the call and that the prediction counts (parameters, buffers, the input)."""
    resident = list(resident)
    if device is None:
        device = next((t.device for t in resident if isinstance(t, torch.Tensor) and t.is_cuda), "cpu")
    device = torch.device(device)
    recorder = _Cuda(device) if device.type == "cuda" else _Cpu()
    _active.append(recorder)
    try:
        with recorder:
            fn()
    finally:
        _active.pop()
    truth = recorder.result()
    truth.resident = resident_bytes(resident)
    return truth


class _Cpu:
    """Profiler allocation events, summed in time order."""

    def __init__(self):
        self.current = START
        self.profile = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True, record_shapes=True
        )

    def __enter__(self):
        self.profile.__enter__()
        return self

    def __exit__(self, *exc):
        return self.profile.__exit__(*exc)

    def mark(self, label: str) -> None:
        self.current = label
        with torch.profiler.record_function(PREFIX + label):
            pass

    def result(self) -> Truth:
        from torch._C._profiler import _EventType

        events: list = []  # (time, kind, payload)
        stack: list = []

        def walk(node) -> None:
            if node.tag == _EventType.Allocation:
                fields = node.extra_fields
                if fields.device.type == "cpu" and fields.alloc_size:
                    events.append((node.start_time_ns, 1, (fields.alloc_size, fields.ptr, tuple(stack))))
                return
            if node.name.startswith(PREFIX):
                events.append((node.start_time_ns, 0, node.name[len(PREFIX) :]))
                return
            stack.append(node.name)
            for child in node.children:
                walk(child)
            stack.pop()

        for root in self.profile.profiler.kineto_results.experimental_event_tree():
            walk(root)
        events.sort(key=lambda e: (e[0], e[1]))
        return _replay(events)


def _replay(events: list) -> Truth:
    """The running sum of allocation events in time order: peak, phases, live set at peak."""
    live_now, peak, peak_at, peak_phase = 0, 0, -1, START
    current = START
    phases: dict = {START: [0, 0]}
    for i, (_, kind, payload) in enumerate(events):
        if kind == 0:
            current = payload
            entry = phases.setdefault(current, [live_now, live_now])
            entry[0] = max(entry[0], live_now)
            continue
        live_now += payload[0]
        entry = phases[current]
        entry[0] = max(entry[0], live_now)
        if live_now > peak:
            peak, peak_at, peak_phase = live_now, i, current
    # the live set at the peak: the allocations made up to it and not freed before it
    alive: dict = {}
    current = START
    for _, kind, payload in events[: peak_at + 1]:
        if kind == 0:
            current = payload
            continue
        size, ptr, stack = payload
        if size > 0:
            alive[ptr] = Allocation(size, stack, current)
        else:
            alive.pop(ptr, None)
    live = sorted(alive.values(), key=lambda a: -a.bytes)
    return Truth(peak, 0, peak_phase, {k: Phase(v[0], v[1]) for k, v in phases.items()}, live)


class _Cuda:
    """``max_memory_allocated``, reset at every mark."""

    def __init__(self, device: torch.device):
        self.device = device
        self.current = START
        self.phases: dict = {}

    def __enter__(self):
        torch.cuda.synchronize(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc):
        self._close()
        return False

    def _close(self) -> None:
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - self.base
        old = self.phases.get(self.current)
        self.phases[self.current] = Phase(max(peak, old.peak if old else peak), -1)

    def mark(self, label: str) -> None:
        self._close()
        torch.cuda.reset_peak_memory_stats(self.device)
        self.current = label

    def result(self) -> Truth:
        top = max(self.phases, key=lambda k: self.phases[k].peak)
        return Truth(self.phases[top].peak, 0, top, dict(self.phases))
