"""Stage 3, plan: :class:`~.analyze.Analysis` -> plain data, and the tiles of each input size.

* :mod:`.trunk`: :class:`TrunkGeometry`, the trunk as plain data;
* :mod:`.plan`: :class:`Plan` (sympy: strides, receptive fields, halos, block per tile),
  the exact region walk and the tile ABI entries;
* :mod:`.widths`: closed-form region widths for fast splits;
* :mod:`.tiling`: :class:`ShapePlan`, the tiles of one input size under a schedule;
* :mod:`.schedule`: :class:`Schedule`, how the tiles run (carry or recompute);
* :mod:`.lower`: stages 1 to 3 in one call (:func:`lower`).

Imports :mod:`fxstream.errors`, :mod:`fxstream.ops.table`, :mod:`fxstream.frontend` and
:mod:`fxstream.analysis` only: nothing that runs tiles.
"""
