"""conveyor: pipeline-parallel training and inference for PyTorch.

See README.md for a tour; the public names are listed in ``__all__``.
"""

from .errors import ConveyorError, LaunchError, PeerLostError, PipelineError
from .launch import launch, run
from .partition import Pipe, materialize, pipeline
from .runtime import PipelineRunner
from .schedule import Action, Schedule, ScheduleError

__all__ = [
    "Action", "ConveyorError", "LaunchError", "PeerLostError", "Pipe", "PipelineError", "PipelineRunner",
    "Schedule", "ScheduleError", "launch", "materialize", "pipeline", "run",
]

__version__ = "0.1.0"
