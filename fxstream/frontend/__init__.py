"""Stage 1, trace: ``nn.Module`` -> ``fx.GraphModule``.

* :mod:`.trace`: torch.fx tracing with stack traces and concrete sizes where Python needs them;
* :mod:`.tracecheck`: the traced graph checked against the eager model on a probe input;
* :mod:`.functionalize`: in-place ops rewritten out of place.

Imports :mod:`fxstream.errors` and :mod:`fxstream.ops.table` only.
"""
