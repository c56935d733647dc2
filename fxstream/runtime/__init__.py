"""Stages 4 and 5, generate and execute: a :class:`~fxstream.planning.lower.Lowered` trunk
-> FX graphs -> tiles run under autograd.

* :mod:`.codegen`: the per-tile graph and the outer graph, and :class:`StreamedTrunk`;
* :mod:`.executor`: the ``autograd.Function`` that runs the tiles (carry and recompute);
* :mod:`.kernels`: what the tile code calls besides torch (windows, tiled average
  pooling, resampling taps); :mod:`.settings`: the run-time settings;
* :mod:`.rng`: random draws replayed per tile; :mod:`.live`: the model's current members;
  :mod:`.channels`: the input's channel count checked before any pixel is read;
  :mod:`.progress`: the tile progress bar and :class:`StreamStats`; :mod:`.threads`: the
  warning when torch has more CPU threads than free cores.

Imports the stages below it (errors, ops, analysis, planning) and :mod:`fxstream.io`;
never :mod:`fxstream.memory`, :mod:`fxstream.module` or the CLI.
"""

from .settings import StreamSettings  # 0.1.0 pickles name it fxstream.runtime.StreamSettings

__all__ = ["StreamSettings"]
