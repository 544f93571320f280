"""GPipe fill-drain: every forward, then every backward (Huang et al., 2019).

4 stages, 4 micro-batches (F = forward, B = backward, digits = micro-batch)::

    rank 0: F0 F1 F2 F3 .. .. .. .. .. .. B0 B1 B2 B3
    rank 1: .. F0 F1 F2 F3 .. .. .. .. B0 B1 B2 B3 ..
    rank 2: .. .. F0 F1 F2 F3 .. .. B0 B1 B2 B3 .. ..
    rank 3: .. .. .. F0 F1 F2 F3 B0 B1 B2 B3 .. .. ..

Stage ``s`` holds the activations of all ``m`` micro-batches at the flush; with
``recompute=True`` it keeps only their inputs and re-runs the forward inside the backward.
"""

from __future__ import annotations

from .actions import BACKWARD, FORWARD, Action, Schedule
from .checks import require_one_stage_per_rank

__all__ = ["gpipe"]


def gpipe(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """The fill-drain program: one stage per rank."""
    require_one_stage_per_rank("gpipe", n_ranks, n_stages)
    ranks = tuple(
        tuple(Action(FORWARD, stage, i) for i in range(n_microbatches))
        + tuple(Action(BACKWARD, stage, i) for i in range(n_microbatches))
        for stage in range(n_stages)
    )
    return Schedule(ranks, n_stages, n_microbatches, name="gpipe")
