"""CPU threads against the cores free for this process: warn once before a streamed step
that would wait for descheduled threads.

A multi-threaded (OpenMP) CPU op ends at a barrier that waits for all of torch's intra-op
threads. When the process has more threads than cores free for it (a CPU affinity mask, a
container's CPU quota, other jobs on a shared machine), a thread the kernel has
descheduled holds up the others at every barrier. A streamed step runs many more, smaller
ops than a plain step, so it pays this far more often. Measured on a shared 2-core machine
(benchmarks/threads.py, BENCHMARKS.md; examples/demo.py's step, 1280x960): with two threads
and less than two free cores the streamed (carry) step took 43 to 154 s against 10 to 16 s
with one thread, while the plain step changed by 0.7x to 1.3x. The waiting threads spin
(libgomp's default), taking the core the descheduled thread needs: ``OMP_WAIT_POLICY=PASSIVE``
in the environment of a new process brought the streamed step back to 13 to 16 s.

:func:`check` runs before the first streamed step on a CPU compute device and warns once
per process (:class:`fxstream.PerformanceWarning`) when ``torch.get_num_threads()`` exceeds

* the CPUs this process may use: ``os.sched_getaffinity`` and the cgroup v2 quota
  (``/sys/fs/cgroup/cpu.max``), or
* the cores left free by other work: the usable CPUs minus the 1-minute load average, less
  this process's own share of it (its CPU time over its lifetime, at most one core per
  thread), with half a core of slack.

Nothing is measured on an accelerator, or with one thread.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings

import torch

from ..errors import PerformanceWarning

SLACK = 0.5  # cores: the load average is an estimate; warn only when clearly short
_warned = False


def usable_cpus() -> tuple[int, str]:
    """The CPUs this process may run on, and where that number comes from."""
    try:
        cpus, source = len(os.sched_getaffinity(0)), "CPU affinity"
    except (AttributeError, OSError):
        cpus, source = os.cpu_count() or 1, "CPUs"
    quota = cgroup_quota()
    if quota is not None and quota < cpus:
        return quota, "container CPU quota"
    return cpus, source


def cgroup_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The cgroup v2 CPU quota in whole cores (rounded up), or None when unlimited or unknown."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        return None


def load_average() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def own_load() -> float:
    """This process's average number of busy cores since it started: its share of the load
    average (1.0 where the start time is unknown)."""
    try:
        with open("/proc/self/stat") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            age = float(f.read().split()[0]) - started
    except (OSError, ValueError, IndexError):
        return 1.0
    return time.process_time() / age if age > 1.0 else 1.0


def diagnose(threads: int) -> tuple[str, int] | None:
    """Why ``threads`` intra-op threads are too many for this process, and a thread count
    that fits; None when they fit."""
    if threads <= 1:
        return None
    cpus, source = usable_cpus()
    load = load_average()
    others = 0.0 if load is None else max(0.0, load - min(own_load(), threads))
    free = cpus - others
    fit = max(1, min(cpus, math.floor(free + SLACK)))
    if threads > cpus:
        return f"this process may use {cpus} CPU{'s' if cpus > 1 else ''} ({source})", fit
    if load is not None and threads > free + SLACK:
        reason = (
            f"other work keeps about {others:.1f} of the {cpus} CPUs busy (1-minute load average {load:.1f}), "
            f"leaving about {max(free, 0.0):.1f} free"
        )
        return reason, fit
    return None


def check(device: torch.device) -> None:
    """Warn once per process if a streamed step on ``device`` would run more intra-op
    threads than the cores free for it."""
    global _warned
    if _warned or device.type != "cpu":
        return
    threads = torch.get_num_threads()
    found = diagnose(threads)
    if found is None:
        return
    _warned = True
    reason, fit = found
    warnings.warn(
        f"fxstream: torch runs {threads} CPU threads per op, but {reason}. A streamed step runs many small ops, "
        "each of which waits for all its threads: with a descheduled thread it can take several times longer "
        f"(a plain step suffers less). Fix: call torch.set_num_threads({fit}) (or set OMP_NUM_THREADS={fit}) "
        "before the first step; on a shared machine, one thread per process. Or start Python with "
        "OMP_WAIT_POLICY=PASSIVE in the environment, so that waiting threads sleep instead of spinning. This "
        "warning is shown once; silence it with "
        "warnings.filterwarnings('ignore', category=fxstream.PerformanceWarning).",
        PerformanceWarning,
        stacklevel=_caller_level(),
    )


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside fxstream, torch and torch.fx's generated
    code: the user's call."""
    inside = (os.path.dirname(os.path.dirname(__file__)), os.path.dirname(torch.__file__))
    frame, level = sys._getframe(2), 2  # the caller of check()
    while frame is not None and frame.f_code.co_filename.startswith(inside + ("<eval_with_key>",)):
        frame, level = frame.f_back, level + 1
    return level if frame is not None else 2
