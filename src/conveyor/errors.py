"""Exceptions raised by conveyor; each message names the problem and, where there is one, the fix."""

from __future__ import annotations

__all__ = ["CheckpointError", "ConveyorError", "LaunchError", "PipelineError", "PeerLostError", "CallMismatchError",
           "StallError", "PeerLeftError"]


class ConveyorError(Exception):
    """Base class of conveyor's own errors."""


class CheckpointError(ConveyorError, ValueError):
    """A checkpoint that cannot be read (missing, corrupted, truncated or foreign files, paths
    outside its folder), or that does not fit the model or optimizer."""


class LaunchError(ConveyorError):
    """A rank of a launched job raised, died or timed out; ``rank`` names it."""

    def __init__(self, message: str, rank: int | None = None, details: str = "") -> None:
        super().__init__(message + (f"\n{details}" if details else ""))
        self.rank = rank
        self.details = details


class PipelineError(ConveyorError):
    """An action of the pipeline failed on this rank: names rank, stage, micro-batch and action."""

    def __init__(self, message: str, *, rank: int, stage: int | None = None,
                 microbatch: int | None = None, action: str | None = None) -> None:
        where = [f"rank {rank}"]
        if stage is not None:
            where.append(f"stage {stage}")
        if microbatch is not None:
            where.append(f"micro-batch {microbatch}")
        if action is not None:
            where.append(f"action {action}")
        super().__init__(f"{', '.join(where)}: {message}")
        self.rank, self.stage, self.microbatch, self.action = rank, stage, microbatch, action


class PeerLostError(PipelineError):
    """A peer rank stopped answering or closed its connection: a consequence, not a cause."""


class CallMismatchError(PipelineError):
    """The ranks of a pipeline made different calls (``step()`` on one, ``forward()`` on another,
    or one rank no call at all): names every rank and its call."""


class StallError(PipelineError):
    """A rank has been in one action longer than the runner's ``stall_timeout``: names it."""


class PeerLeftError(PeerLostError):
    """A rank left the job (closed its runner or ended) while its peers still wait for it; like
    every lost peer, a consequence on the waiting rank (the launcher names the rank that left)."""
