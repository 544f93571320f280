"""Executes a schedule's program: one rank per process (runner), or all ranks in one process (local)."""

from .local import LocalPipeline
from .precision import LossScaler
from .runner import PipelineRunner, TraceEvent

__all__ = ["LocalPipeline", "LossScaler", "PipelineRunner", "TraceEvent"]
