"""This process's memory as Linux reports it (the benchmarks that measure RSS share these)."""

from __future__ import annotations


def status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field in bytes, e.g. ``VmHWM`` (the peak RSS) or ``RssAnon``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Reset the peak RSS to the current RSS (``VmHWM := VmRSS``)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
