"""conveyor: pipeline-parallel training and inference for PyTorch.

See README.md for a tour; the public names are listed in ``__all__``.
"""

from . import timeline
from .checkpoint import load_full, save_full
from .errors import (
                     CallMismatchError,
                     CheckpointError,
                     ConveyorError,
                     LaunchError,
                     PeerLeftError,
                     PeerLostError,
                     PipelineError,
                     StallError,
)
from .launch import launch, run
from .partition import Pipe, TraceError, materialize, pipe_split, pipeline
from .planning import plan, profile
from .runtime import LocalPipeline, LossScaler, PipelineRunner
from .runtime.mesh import mesh
from .schedule import Action, Schedule, ScheduleError, simulate

__all__ = [
    "Action", "CallMismatchError", "CheckpointError", "ConveyorError", "LaunchError", "LocalPipeline", "LossScaler",
    "PeerLeftError", "PeerLostError", "Pipe", "PipelineError",
    "PipelineRunner", "Schedule", "ScheduleError", "StallError", "TraceError", "launch", "load_full", "materialize",
    "mesh", "pipe_split", "pipeline", "plan", "profile", "run", "save_full", "simulate", "timeline",
]

__version__ = "0.1.0"
