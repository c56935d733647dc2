"""Stage 2, analyse: ``fx.GraphModule`` -> :class:`~.analyze.Analysis`.

* :mod:`.analyze`: the streamable trunk, its outputs and boundary, per-node verdicts of the
  op table, tensor layouts; rejects non-local ops;
* :mod:`.diagnose`: what to tell the user when the trunk cannot stream (the kind of
  non-local op, the largest streamable prefix);
* :mod:`.names`: ``boundary=`` names resolved to nodes.

Imports :mod:`fxstream.errors`, :mod:`fxstream.ops.table` and :mod:`fxstream.frontend` only.
"""
