"""F&B pairs made from a program: ``pair_overlapping(schedule)`` joins adjacent forwards and
backwards of a rank into pairs wherever that stays legal.

The pairs change when actions may start, never what they compute: each stage still runs the same
forwards and the same backwards in the same order, so the gradients are exactly the unpaired
program's (the runtime runs a pair's two chunks at once, on independent micro-batches).
"""

from __future__ import annotations

from .actions import BACKWARD, FORWARD, INPUT_GRAD, Action, Schedule
from .simulate import Costs, simulate
from .validate import ScheduleError

__all__ = ["pair_overlapping"]

_BACKWARDS = (BACKWARD, INPUT_GRAD)


def _pairable(first: Action, second: Action) -> bool:
    if first.overlaps_next or (first.stage, first.microbatch) == (second.stage, second.microbatch):
        return False
    return {first.kind, second.kind} in ({FORWARD, BACKWARD}, {FORWARD, INPUT_GRAD})


def _makespan(schedule: Schedule, ranks: list[list[Action]], costs: Costs | None, comm: float,
              overlap: float) -> float | None:
    """The simulated makespan, or None if the program deadlocks."""
    program = Schedule(tuple(tuple(r) for r in ranks), schedule.n_stages, schedule.n_microbatches,
                       schedule.placement, schedule.name, replicas=schedule.replicas)
    try:
        return simulate(program, costs=costs, comm=comm, overlap=overlap).makespan
    except ScheduleError:
        return None


def pair_overlapping(schedule: Schedule, *, costs: Costs | None = None, comm: float = 0.0, overlap: float = 0.0,
                     reorder: bool = True) -> Schedule:
    """``schedule`` with adjacent forward/backward actions of each rank joined into F&B pairs.

    Rank by rank, left to right, a forward next to a backward (``B`` or ``I``) of another (stage,
    micro-batch) becomes a pair (written forward first) if the program stays deadlock-free with
    it (a pair waits for both of its inputs) and its simulated makespan (``costs``, ``comm`` and
    ``overlap`` as in :func:`simulate`) does not grow. With the default ``overlap=0`` that holds
    even if the pairs hide nothing, so pairing can only gain; a larger ``overlap`` (what the
    stages are known to hide) also accepts pairs that pay off only by overlapping.
    ``reorder=False`` pairs only a forward followed by a backward. Streaming and forward-only
    programs are returned unchanged.
    """
    if schedule.stream is not None or not schedule.is_training:
        return schedule
    ranks = [list(actions) for actions in schedule.ranks]
    best = _makespan(schedule, ranks, costs, comm, overlap)
    if best is None:
        raise ScheduleError(f"cannot pair {schedule.name!r}: the program itself deadlocks")
    for actions in ranks:
        position = 0
        while position + 1 < len(actions):
            first, second = actions[position], actions[position + 1]
            if _pairable(first, second) and (first.kind == FORWARD or reorder):
                forward, backward = (first, second) if first.kind == FORWARD else (second, first)
                actions[position], actions[position + 1] = forward.paired(), backward
                makespan = _makespan(schedule, ranks, costs, comm, overlap)
                if makespan is not None and makespan <= best + 1e-9:
                    best = makespan
                    position += 2
                    continue
                actions[position], actions[position + 1] = first, second
            position += 1
    name = schedule.name if schedule.name.endswith(" (paired)") else f"{schedule.name} (paired)"
    return Schedule(tuple(tuple(r) for r in ranks), schedule.n_stages, schedule.n_microbatches, schedule.placement,
                    name, replicas=schedule.replicas)
