"""fxstream: exact tiled training of convolutional networks on images larger than memory.

Pipeline: trace -> analyse -> plan -> generate (see ``fxstream.module.build_program``).
"""

from .errors import (
    ArgumentError,
    BoundaryError,
    ChannelError,
    ContractError,
    FxStreamError,
    ImageFileError,
    InputChangedError,
    InputShapeError,
    LevelError,
    PlannerError,
    TileGroupError,
    TileSizeError,
    TraceError,
    UnsupportedOpError,
)
from .module import StreamedModule, compile
from .plan import Plan
from .progress import StreamStats
from .schedule import Schedule, ScheduleError
from .slides import SlideArray, SlideDataset, open_image
from .tiling import ShapePlan
from .trace import trace
from .training import serial_backward, train_step
from .transfer import Normalize

__version__ = "0.1.0"

__all__ = [
    "compile",
    "trace",
    "StreamedModule",
    "serial_backward",
    "train_step",
    "Normalize",
    "open_image",
    "SlideArray",
    "SlideDataset",
    "StreamStats",
    "Plan",
    "ShapePlan",
    "Schedule",
    "ScheduleError",
    "FxStreamError",
    "UnsupportedOpError",
    "TraceError",
    "TileSizeError",
    "TileGroupError",
    "BoundaryError",
    "InputShapeError",
    "PlannerError",
    "ArgumentError",
    "ContractError",
    "InputChangedError",
    "ChannelError",
    "ImageFileError",
    "LevelError",
]
