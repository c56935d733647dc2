"""Global statistics at run time: the passes of one call of a trunk with statistics (issue 20,
``docs/design-statistics.md``).

The trunk's generated *driver* (``codegen.driver_graph``) calls, per level ``j``,
:func:`statistics` (pass ``j``: the finished value of each level-``j`` statistic), runs the
statistic heads on them, and last :func:`stream` (the output pass).
"""

from __future__ import annotations


def statistics(call, level: int, *values):
    """Pass ``level``: the finished value of each of its statistics (a tuple)."""
    raise NotImplementedError("statistics passes are not executed yet")


def stream(call, *values):
    """The output pass: the trunk output(s), reading the statistic ``values``."""
    raise NotImplementedError("statistics passes are not executed yet")
