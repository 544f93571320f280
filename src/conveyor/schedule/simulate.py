"""Event-driven timing of a schedule: makespan, bubble, busy time, peak live activations.

Each rank runs its actions in program order. An action starts when its rank is free and the
message it needs (:func:`links.required_message`) has arrived; the replicas of a stage start an
update together, when the last of them is ready. A message between two different
ranks arrives ``comm`` after the action that produced it ends; a hand-off between two stages on
the same rank is immediate. Sending overlaps compute and links never contend (a latency model),
so with ``comm=0`` the result is the schedule's ideal.

A micro-batch's activations on a stage are live from the start of its ``F`` until its ``B`` ends
(or its ``W`` ends, for a split backward; its ``F`` ends, for a forward-only program).

An F&B pair starts once both of its inputs are there; its forward runs first and sends when it
ends. It costs ``F + B`` unless ``overlap`` says that a fraction of the shorter chunk hides under
the longer (``overlap=1``: the pair costs ``max(F, B)``); the hidden time comes off its backward.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from .actions import BACKWARD, FORWARD, INPUT_GRAD, KINDS, UPDATE, WEIGHT_GRAD, Action, Schedule
from .links import Message, outgoing, required_message
from .validate import execution_order

__all__ = ["DEFAULT_COSTS", "Event", "SimulationResult", "simulate"]

DEFAULT_COSTS: dict[str, float] = {FORWARD: 1.0, BACKWARD: 2.0, INPUT_GRAD: 1.0, WEIGHT_GRAD: 1.0, UPDATE: 0.0}

Costs = Mapping[str, float | Sequence[float]]


class Event(NamedTuple):
    """One timed action: ``rank`` ran ``action`` from ``start`` to ``end``."""

    rank: int
    action: Action
    start: float
    end: float


@dataclass(frozen=True)
class SimulationResult:
    """The timing of one step of ``schedule``.

    ``bubble`` is ``1 - sum(busy) / (n_ranks * makespan)``; ``busy[r]`` is rank ``r``'s compute
    time; ``peak_activations[s]`` the most micro-batches live at once on stage ``s``;
    ``peak_before_input_grad[s]`` the same, counting a micro-batch only until its ``B`` or ``I``
    ends (the full activations; after ``I`` a split backward keeps only what ``W`` needs);
    ``rank_peak_activations[r]`` the most (stage, micro-batch) activations live at once on rank
    ``r`` over all its stages, one micro-batch on one stage counting 1 (a V rank's two half-size
    stages count 2 where 1F1B's one stage counts 1; multiply by a stage's bytes per micro-batch).
    """

    schedule: Schedule
    makespan: float
    bubble: float
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    peak_before_input_grad: tuple[int, ...]
    events: list[Event]
    rank_peak_activations: tuple[int, ...] = ()

    @property
    def n_ranks(self) -> int:
        return self.schedule.n_ranks


def _cost_table(costs: Costs | None, n_stages: int) -> dict[str, tuple[float, ...]]:
    merged: dict[str, Any] = {**DEFAULT_COSTS, **(costs or {})}
    table: dict[str, tuple[float, ...]] = {}
    for kind, value in merged.items():
        if kind not in KINDS:
            raise ValueError(f"costs has an unknown action kind {kind!r}; use {KINDS}")
        per_stage = (float(value),) * n_stages if isinstance(value, int | float) else tuple(map(float, value))
        if len(per_stage) != n_stages:
            raise ValueError(
                f"costs[{kind!r}] has {len(per_stage)} values for {n_stages} stages: give one per stage or a number"
            )
        if any(c < 0 for c in per_stage):
            raise ValueError(f"costs[{kind!r}] has a negative value: {per_stage}")
        table[kind] = per_stage
    return table


def _peak(intervals: list[tuple[float, float]]) -> int:
    """Most intervals open at once; one that ends exactly when another starts does not overlap it."""
    points = sorted([(round(end, 9), -1) for _, end in intervals] + [(round(start, 9), 1) for start, _ in intervals])
    live = peak = 0
    for _, step in points:
        live += step
        peak = max(peak, live)
    return peak


def simulate(
    schedule: str | Schedule,
    n_stages: int | None = None,
    n_microbatches: int | None = None,
    costs: Costs | None = None,
    *,
    n_ranks: int | None = None,
    comm: float = 0.0,
    overlap: float = 0.0,
    **options: Any,
) -> SimulationResult:
    """Time one step of ``schedule`` (a name from ``SCHEDULES`` or a :class:`Schedule`).

    ``costs`` maps an action kind to its duration, or to a list of per-stage durations
    (defaults: F=1, B=2, I=1, W=1). A named schedule needs ``n_stages`` and ``n_microbatches``;
    ``n_ranks`` defaults to ``n_stages``. ``overlap`` (0 to 1) is the fraction of an F&B pair's
    shorter chunk that hides under the other. ``options`` go to the schedule's generator.
    Raises :class:`ScheduleError` if the program is incomplete or deadlocks.
    """
    from . import make_schedule  # the registry imports this module

    if isinstance(schedule, Schedule):
        n_stages = schedule.n_stages if n_stages is None else n_stages
        n_microbatches = schedule.n_microbatches if n_microbatches is None else n_microbatches
        n_ranks = schedule.n_ranks if n_ranks is None else n_ranks
    elif n_stages is None or n_microbatches is None:
        raise TypeError(f"simulate({schedule!r}, ...) needs n_stages and n_microbatches")
    program = make_schedule(schedule, n_ranks or n_stages, n_stages, n_microbatches, **options)
    table = _cost_table(costs, program.n_stages)
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap={overlap} is the fraction of a pair's shorter chunk that is hidden: give 0 to 1")
    training = program.is_training

    free = [0.0] * program.n_ranks
    arrival: dict[Message, float] = {}
    timing: dict[Action, tuple[float, float]] = {}
    events: list[Event] = []
    order = execution_order(program)  # a legal order: every message is sent before it is needed
    barrier: dict[int, float] = {}  # position in ``order`` -> start of a replicated update
    hidden = 0.0  # of the pair being timed: the time its backward saves by overlapping its forward
    for position, (rank, action) in enumerate(order):
        group = program.replicas[action.stage]
        if action.kind == UPDATE and len(group) > 1 and position not in barrier:
            # execution_order lists a replicated update's replicas together, after all their earlier
            # actions: they start it when the last of them is free
            members = range(position, position + len(group))
            barrier.update(dict.fromkeys(members, max(free[order[i][0]] for i in members)))
        needed = required_message(action, program.n_stages)
        start = max(free[rank], arrival[needed] if needed is not None else 0.0, barrier.get(position, 0.0))
        duration = table[action.kind][action.stage]
        if action.overlaps_next:  # the pair waits for its backward's input too (execution_order lists it next)
            partner = order[position + 1][1]
            partner_needs = required_message(partner, program.n_stages)
            start = max(start, arrival[partner_needs] if partner_needs is not None else 0.0)
            hidden = overlap * min(duration, table[partner.kind][partner.stage])
        elif position and order[position - 1][1].overlaps_next and order[position - 1][0] == rank:
            duration -= hidden
        end = start + duration
        free[rank] = end
        timing[action] = (start, end)
        events.append(Event(rank, action, start, end))
        message = outgoing(action, program.n_stages, training)
        if message is not None:
            same_rank = program.rank_of(message.target_stage, message.microbatch) == rank
            arrival[message] = end + (0.0 if same_rank else comm)

    events.sort(key=lambda e: (e.start, e.rank))
    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * program.n_ranks
    for event in events:
        busy[event.rank] += event.end - event.start
    bubble = 1.0 - sum(busy) / (program.n_ranks * makespan) if makespan > 0 else 0.0

    def lifetimes(stage: int, release_kinds: tuple[str, ...]) -> list[tuple[float, float]]:
        intervals = []
        for microbatch in range(program.n_microbatches):
            start, end = timing[Action(FORWARD, stage, microbatch)]
            for kind in release_kinds:
                end = timing.get(Action(kind, stage, microbatch), (0.0, end))[1]
            intervals.append((start, end))
        return intervals

    def peaks(release_kinds: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(_peak(lifetimes(stage, release_kinds)) for stage in range(program.n_stages))

    def rank_peaks() -> tuple[int, ...]:
        # a replicated stage's micro-batches are split over its replicas: count each on the rank that ran it
        result = []
        for rank in range(program.n_ranks):
            intervals = [interval for stage in program.stages_of(rank)
                         for microbatch, interval in enumerate(lifetimes(stage, (BACKWARD, WEIGHT_GRAD)))
                         if program.rank_of(stage, microbatch) == rank]
            result.append(_peak(intervals))
        return tuple(result)

    return SimulationResult(
        schedule=program,
        makespan=makespan,
        bubble=bubble,
        busy=tuple(busy),
        peak_activations=peaks((BACKWARD, WEIGHT_GRAD)),
        peak_before_input_grad=peaks((BACKWARD, INPUT_GRAD)),
        events=events,
        rank_peak_activations=rank_peaks(),
    )
