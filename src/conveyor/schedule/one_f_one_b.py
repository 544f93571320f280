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

from .actions import BACKWARD, FORWARD, Action, Schedule
from .checks import require_one_stage_per_rank

__all__ = ["one_f_one_b"]


def _stage_program(stage: int, n_stages: int, n_microbatches: int) -> tuple[Action, ...]:
    warmup = min(n_stages - stage - 1, n_microbatches)
    program = [Action(FORWARD, stage, i) for i in range(warmup)]
    for i in range(n_microbatches - warmup):
        program.append(Action(FORWARD, stage, warmup + i))
        program.append(Action(BACKWARD, stage, i))
    program += [Action(BACKWARD, stage, i) for i in range(n_microbatches - warmup, n_microbatches)]
    return tuple(program)


def one_f_one_b(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """The 1F1B program with a flush at the end of the step: one stage per rank."""
    require_one_stage_per_rank("1f1b", n_ranks, n_stages)
    ranks = tuple(_stage_program(stage, n_stages, n_microbatches) for stage in range(n_stages))
    return Schedule(ranks, n_stages, n_microbatches, name="1f1b")
