"""The memory and cost models, and the automatic choices made from them.

* :mod:`.model`: :class:`MemoryModel`, the predicted peak bytes of a step, streamed and plain;
* :mod:`.nodestats`: bytes per pixel of every trunk node, measured on a small probe;
* :mod:`.auto`: ``tile_size="auto"`` and ``boundary="auto"``: returns a :class:`Choice`;
* :mod:`.units`: ``"8GiB"`` and back.

Imports the stages up to :mod:`fxstream.planning`; never the runtime or the module.
"""
