"""Executes a schedule's program for one rank: transport, stages, runner."""

from .runner import PipelineRunner, TraceEvent

__all__ = ["PipelineRunner", "TraceEvent"]
