"""fxstream: exact tiled training of convolutional networks on images larger than memory.

Pipeline (``fxstream.module.build_program``; ``docs/architecture.md`` has the map):
``frontend`` (trace) -> ``analysis`` -> ``planning`` -> ``runtime`` (generate, execute),
with ``ops`` (the op table) below them, ``memory`` (the memory model, automatic choices)
and ``io`` (array-likes, slides) beside them, and ``cli`` on top.
"""

import sys as _sys

from .errors import (
    ArgumentError,
    BoundaryError,
    BranchError,
    ChannelError,
    ContractError,
    FxStreamError,
    ImageFileError,
    InputChangedError,
    InputShapeError,
    LevelError,
    PerformanceWarning,
    PlannerError,
    StatisticsError,
    TileGroupError,
    TileSizeError,
    TraceError,
    UnsupportedOpError,
)
from .frontend.trace import trace
from .io import slides  # fxstream.slides.collate
from .io import transfer as _transfer
from .io.slides import SlideArray, SlideDataset, open_image
from .io.transfer import Normalize
from .module import StreamedModule, compile
from .planning import plan as _plan
from .planning import schedule as _schedule
from .planning import tiling as _tiling
from .planning.plan import Plan
from .planning.schedule import Schedule, ScheduleError
from .planning.tiling import ShapePlan
from .runtime import progress as _progress
from .runtime.progress import StreamStats
from .training import serial_backward, train_step

__version__ = "0.2.0"

# Module paths of 0.1.0 (a flat package) that its pickles and public classes name: a
# StreamedModule saved by 0.1.0 names fxstream.schedule.Schedule, fxstream.transfer.Normalize
# and fxstream.progress.StreamStats (fxstream.runtime.StreamSettings is exported by the
# fxstream.runtime package). These aliases let such files load.
for _old, _new in {
    "schedule": _schedule,
    "transfer": _transfer,
    "progress": _progress,
    "slides": slides,
    "plan": _plan,
    "tiling": _tiling,
}.items():
    _sys.modules.setdefault(f"{__name__}.{_old}", _new)
del _old, _new

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
    "StatisticsError",
    "TraceError",
    "TileSizeError",
    "TileGroupError",
    "BoundaryError",
    "InputShapeError",
    "BranchError",
    "PlannerError",
    "PerformanceWarning",
    "ArgumentError",
    "ContractError",
    "InputChangedError",
    "ChannelError",
    "ImageFileError",
    "LevelError",
]
