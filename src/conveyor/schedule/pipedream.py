"""PipeDream: asynchronous 1F1B with weight stashing (Narayanan et al., SOSP 2019).

Every stage updates its weights after each backward, so the pipeline never flushes. The forward
of micro-batch ``k`` uses the newest weights at that moment and its backward uses the *same*
version (weight stashing). 3 stages, updates as ``U``, versions after ``v``::

    stage 0: F0v0 F1v0 F2v0 B0 U  F3v1 B1 U  F4v2 B2 U  ...
    stage 1:      F0v0 F1v0 B0 U  F2v1 B1 U  F3v2 B2 U  ...
    stage 2:           F0v0 B0 U  F1v1 B1 U  F2v2 B2 U  ...

Stage ``s`` of ``p`` has at most ``p - s`` micro-batches in flight, so it keeps at most ``p - s``
weight versions. With ``vertical_sync=True`` micro-batch ``k`` uses the same version on every
stage: the one the input stage used, ``max(0, k - p + 1)`` (later stages keep older versions
for it).

Replicated stages (1F1B-RR, ``replicas=[2, 1, 1]``): the replicas of a slow stage take its
micro-batches round robin; each worker admits ``ceil(workers from its stage on / replicas of
its stage)`` micro-batches (PipeDream's NOAM at the input stage), and the replicas' n-th updates
are one all-reduced step on the mean gradient of their micro-batches. The replicas wait for each
other at every update, and the second reaches it one downstream cycle after the first; admitting
one more micro-batch at the input stage (``admitted=3`` for ``[2, 1, 1]``) hides that wait (the
simulator: 45 -> 30 time units per micro-batch for a stage 0 twice as slow as the others).
"""

from __future__ import annotations

from collections.abc import Sequence

from .actions import Schedule
from .stream import streaming_schedule

__all__ = ["pipedream"]


def pipedream(n_ranks: int, n_stages: int, n_microbatches: int, vertical_sync: bool = False,
              replicas: Sequence[int] | None = None, admitted: int | None = None) -> Schedule:
    """PipeDream's 1F1B with an update after every backward; ``vertical_sync`` pins each
    micro-batch to the input stage's weight version on every stage. ``replicas[s]`` ranks run
    stage ``s`` (1F1B-RR): they take its micro-batches round robin and all-reduce their
    gradients in each update, so a replicated stage updates once per round. ``admitted`` sets
    the micro-batches each input-stage worker has in flight (default: NOAM)."""
    if vertical_sync and replicas is not None and any(count > 1 for count in replicas):
        raise ValueError("vertical_sync=True is not supported with replicated stages: drop one of them")

    def version(stage: int, microbatch: int, updates: int) -> int:
        return max(0, microbatch - n_stages + 1) if vertical_sync else updates

    name = "pipedream (vertical sync)" if vertical_sync else "pipedream"
    return streaming_schedule(name, n_ranks, n_stages, n_microbatches, version, lambda microbatch, last: True,
                              replicas, admitted)
