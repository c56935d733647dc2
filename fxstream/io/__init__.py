"""Images that are not tensors, and tiles on their way to the device.

* :mod:`.arrays`: array-likes (numpy arrays, memmaps, zarr) read region by region;
* :mod:`.transfer`: tile crops, host-to-device copies with prefetch, :class:`Normalize`;
* :mod:`.slides`: :func:`open_image` (TIFF/SVS/OpenSlide), :class:`SlideDataset`.

Imports :mod:`fxstream.errors` only.
"""
