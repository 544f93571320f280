"""PipeDream-2BW: double-buffered weights (Narayanan et al., ICML 2021).

Gradients accumulate over a window of ``W`` micro-batches (default: the number of stages) and
are applied together, averaged, once per window. Every micro-batch of window ``j`` runs with
version ``max(0, j - 1)`` on every stage, so the update is

    w(j + 1) = w(j) - lr * mean gradient at w(j - 1)

and, as long as ``W >= n_stages``, a stage never needs more than two versions at once: the one
the window in flight uses and the newest. A stream whose length is not a multiple of ``W``
applies its last, partial window when it ends.
"""

from __future__ import annotations

from .actions import Schedule
from .stream import streaming_schedule

__all__ = ["pipedream_2bw"]


def pipedream_2bw(n_ranks: int, n_stages: int, n_microbatches: int, window: int | None = None) -> Schedule:
    """PipeDream-2BW with gradients averaged over ``window`` micro-batches per update."""
    window = n_stages if window is None else window
    if window < n_stages:
        raise ValueError(f"pipedream-2bw needs window >= n_stages ({n_stages}) to keep two weight versions; "
                         f"got window={window}: pass window={n_stages} or more")

    def version(stage: int, microbatch: int, updates: int) -> int:
        return max(0, microbatch // window - 1)

    def update(microbatch: int, last: bool) -> bool:
        return (microbatch + 1) % window == 0 or last

    return streaming_schedule(f"pipedream-2bw (window {window})", n_ranks, n_stages, n_microbatches, version, update)
