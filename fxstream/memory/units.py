"""Byte counts as people write them: ``parse_bytes("8GiB")`` and ``format_bytes(2**31)``."""

from __future__ import annotations

import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30})


def parse_bytes(value: int | str) -> int:
    """``8GiB``, ``512MiB``, ``1.5GB``, ``1e9`` or an int -> bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", str(value))
    unit = match.group(2).upper() if match else None
    try:
        number = float(match.group(1)) if match else -1.0
    except ValueError:
        number = -1.0
    if unit not in _UNITS or not number > 0:
        raise ValueError(f"memory budget must look like 8GiB, 512MiB, 1.5GB or a byte count, got {value!r}")
    return int(number * _UNITS[unit])


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{int(value)} B"
