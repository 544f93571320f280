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

from collections.abc import Sequence

from .actions import BACKWARD, FORWARD, Action, Schedule
from .checks import replica_groups

__all__ = ["gpipe"]


def gpipe(n_ranks: int, n_stages: int, n_microbatches: int, replicas: Sequence[int] | None = None) -> Schedule:
    """The fill-drain program: one stage per rank, or ``replicas[s]`` ranks for stage ``s`` taking
    its micro-batches round robin."""
    groups = replica_groups("gpipe", n_ranks, n_stages, replicas)
    ranks = []
    for stage, group in enumerate(groups):
        for replica in range(len(group)):
            mine = range(replica, n_microbatches, len(group))
            forwards = tuple(Action(FORWARD, stage, i) for i in mine)
            ranks.append(forwards + tuple(Action(BACKWARD, stage, i) for i in mine))
    return Schedule(tuple(ranks), n_stages, n_microbatches, name="gpipe", replicas=groups)
