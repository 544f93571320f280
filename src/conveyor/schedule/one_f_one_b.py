"""1F1B: after a short warm-up, every stage alternates one forward with one backward
(PipeDream-Flush / DAPPLE; Narayanan et al., 2021).

4 stages, 6 micro-batches::

    rank 0: F0 F1 F2 F3 .. .. B0 F4 B1 F5 B2 .. B3 .. B4 .. B5
    rank 1: .. F0 F1 F2 .. B0 F3 B1 F4 B2 F5 B3 .. B4 .. B5 ..
    rank 2: .. .. F0 F1 B0 F2 B1 F3 B2 F4 B3 F5 B4 .. B5 .. ..
    rank 3: .. .. .. F0 B0 F1 B1 F2 B2 F3 B3 F4 B4 F5 B5 .. ..

Stage ``s`` of ``p`` runs ``p - s - 1`` warm-up forwards, so it never holds more than
``min(p - s, m)`` micro-batches of activations (GPipe holds ``m``); the bubble is the same,
``(p - 1) / (m + p - 1)`` of the step.
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Schedule
from .checks import in_flight, replica_groups
from .stream import worker_actions

__all__ = ["one_f_one_b"]


def one_f_one_b(n_ranks: int, n_stages: int, n_microbatches: int, replicas: Sequence[int] | None = None) -> Schedule:
    """The 1F1B program with a flush at the end of the step: one stage per rank, or ``replicas[s]``
    ranks for stage ``s`` taking its micro-batches round robin (``replicas=[2, 2]``: two 2-stage
    pipelines, i.e. pipeline x data parallelism)."""
    groups = replica_groups("1f1b", n_ranks, n_stages, replicas)
    ranks = []
    for stage, group in enumerate(groups):
        for replica in range(len(group)):
            ranks.append(tuple(worker_actions(stage, in_flight(groups, stage), lambda k: k < n_microbatches,
                                              replica=replica, n_replicas=len(group))))
    return Schedule(tuple(ranks), n_stages, n_microbatches, name="1f1b", replicas=groups)
