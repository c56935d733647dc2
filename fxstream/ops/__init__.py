"""Op knowledge: what each torch op does to the regions of an image.

* :mod:`.table`: the op table: classifies every FX node as a window op (with its per-axis
  stencils), a local (pointwise or channel-only) op, a size query, or non-local;
* :mod:`.geometry`: the region algebra of one axis (stencils, transposed and fractional
  strides, resampling taps), in plain ints and Fractions;
* :mod:`.windows`: one object per window kind: its geometry slots, how the tile code
  computes it, what the memory model must count;
* :mod:`.channel_ops`, :mod:`.shapes`: channel-only ops, and sizes read from the image.

Imports only :mod:`fxstream.errors`.
"""
