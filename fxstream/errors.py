"""The one exception hierarchy of fxstream.

Every error a user can trigger is a subclass of :class:`FxStreamError`. Messages
name what went wrong, where (node, module path, source line) and how to fix it.
"""

from __future__ import annotations


class FxStreamError(Exception):
    """Base class of every error fxstream raises on purpose."""


class TraceError(FxStreamError):
    """Raised by ``compile`` when torch.fx cannot trace the model (data-dependent
    control flow, unsupported Python constructs)."""


class UnsupportedOpError(FxStreamError):
    """Raised by ``compile`` when the streamed trunk contains an op that is not
    local (its output at one pixel depends on the whole image, e.g. BatchNorm in
    training mode, GroupNorm, squeeze-excitation) or that fxstream does not know.

    Attributes: ``node`` (FX node name), ``module_path`` (dotted path of the
    module the op belongs to, or ``""``), ``op`` (a short description).
    """

    def __init__(self, message: str, *, node: str, module_path: str, op: str):
        super().__init__(message)
        self.node = node
        self.module_path = module_path
        self.op = op


class BoundaryError(FxStreamError):
    """Raised by ``compile`` when ``boundary=`` names nothing streamable, or when
    the trunk would have several outputs used by the head."""


class TileSizeError(FxStreamError):
    """Raised by ``compile`` when ``tile_size`` is malformed or too small for the
    trunk's receptive field. ``minimum`` holds the smallest valid size per
    spatial dimension when it is known."""

    def __init__(self, message: str, minimum: tuple[int, ...] | None = None):
        super().__init__(message)
        self.minimum = minimum


class InputShapeError(FxStreamError):
    """Raised on the forward pass when the input does not fit the compiled
    module: wrong number of dimensions, or too small for the network."""


class PlannerError(FxStreamError):
    """An internal inconsistency between the plan and the computed tiles. It
    means a bug in fxstream: please report it with the model."""


class ChannelError(InputShapeError):
    """Raised on the forward pass, before any pixel is read, when the input's channel
    count does not match what the trunk's first convolutions (or a per-channel
    ``input_transform``) read. Attributes: ``expected``, ``got``, ``node``,
    ``module_path`` (None where the transform is the mismatch)."""

    def __init__(
        self,
        message: str,
        *,
        expected: int | None = None,
        got: int | None = None,
        node: str | None = None,
        module_path: str | None = None,
    ):
        super().__init__(message)
        self.expected = expected
        self.got = got
        self.node = node
        self.module_path = module_path


class ImageFileError(FxStreamError):
    """Raised by ``fxstream.open_image`` when a file cannot be read as an image: it is
    missing, not an image format any installed reader knows, or its layout is not one
    2D image (several Z planes or time points). Attribute: ``path``."""

    def __init__(self, message: str, *, path: str):
        super().__init__(message)
        self.path = path


class LevelError(ImageFileError):
    """Raised by ``fxstream.open_image`` when the file has no pyramid level ``level``.
    Attributes: ``path``, ``level``, ``levels`` (the (height, width) of each level)."""

    def __init__(self, message: str, *, path: str, level: int, levels: tuple[tuple[int, int], ...]):
        super().__init__(message, path=path)
        self.level = level
        self.levels = levels
