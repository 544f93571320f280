"""``search``: the program with the smallest simulated makespan under a per-rank activation limit.

The zero-bubble paper's automatic scheduler (Qi et al., 2023, section 3), on one stage per rank:

1. *Heuristic*: a list scheduler builds a program by simulating it. Whenever a rank is free, it
   runs the input-gradient half (``I``, or a whole ``B``) whose gradient has arrived, else a
   forward whose input has arrived (while fewer than the activation limit are held, and at most
   ``ahead`` micro-batches past the stage's backwards), else a deferred weight-gradient half
   (``W``) to fill the bubble (or it waits for an ``I`` due within a fraction of a ``W``). The
   knobs (``ahead`` per stage, that fraction, forward or backward first) are swept.
2. *Seeds*: every registered synchronous schedule with one stage per rank that fits the limit
   (1F1B, ZB-H1, GPipe for few micro-batches, ...), so the result is never worse than them.
3. *Local search*: on the best programs, swaps of adjacent actions of a rank are kept while
   they shorten the simulated makespan without raising any rank's peak over the limit.

The judge is always :func:`simulate`; a micro-batch's activations on a stage count 1 from the
start of its ``F`` to the end of its ``W`` (or ``B``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from .actions import BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action, Schedule
from .simulate import simulate
from .validate import ScheduleError

__all__ = ["search"]

Program = list[list[Action]]


def _table(costs: Mapping[str, float | Sequence[float]], n_stages: int | None) -> tuple[dict[str, list[float]], int]:
    lengths = {len(v) for v in costs.values() if not isinstance(v, int | float)}
    if len(lengths) > 1:
        raise ValueError(f"costs give per-stage lists of different lengths {sorted(lengths)}: give one per stage")
    if n_stages is None:
        if not lengths:
            raise ValueError("give per-stage cost lists or n_stages= to say how many stages there are")
        n_stages = lengths.pop()
    if "F" not in costs or not ("B" in costs or ("I" in costs and "W" in costs)):
        raise ValueError(f"costs need F and either B or both I and W; got {sorted(costs)}")
    table: dict[str, list[float]] = {}
    for kind, value in costs.items():
        per_stage = [float(value)] * n_stages if isinstance(value, int | float) else [float(v) for v in value]
        if len(per_stage) != n_stages:
            raise ValueError(f"costs[{kind!r}] has {len(per_stage)} values for {n_stages} stages")
        if any(v < 0 for v in per_stage):
            raise ValueError(f"costs[{kind!r}] has a negative value: {per_stage}")
        table[kind] = per_stage
    if "B" not in table:
        table["B"] = [i + w for i, w in zip(table["I"], table["W"])]
    if "I" not in table:  # unsplit costs: a split backward is priced as half and half
        table["I"] = [b / 2 for b in table["B"]]
        table["W"] = [b / 2 for b in table["B"]]
    table["U"] = [0.0] * n_stages
    return table, n_stages


def _build(table: dict[str, list[float]], p: int, m: int, limit: int, comm: float, split: bool,
           ahead: Sequence[int], wait_fraction: float, forward_first: bool) -> Program:
    """One program from the list scheduler (see the module docstring)."""
    backward_kind = INPUT_GRAD if split else BACKWARD
    forwards, backwards, weights = [0] * p, [0] * p, [0] * p
    forward_end: dict[tuple[int, int], float] = {}
    backward_end: dict[tuple[int, int], float] = {}
    free = [0.0] * p
    program: Program = [[] for _ in range(p)]
    total = p * m * (3 if split else 2)
    done = 0
    while done < total:
        best: tuple[float, int, str] | None = None
        for stage in range(p):
            choice = _choose(stage, p, m, limit, comm, split, table, ahead[stage], wait_fraction, forward_first,
                             forwards, backwards, weights, forward_end, backward_end, free[stage])
            if choice is not None and (best is None or choice[0] < best[0] - 1e-12):
                best = (choice[0], stage, choice[1])
        assert best is not None, "the list scheduler found no action to run"
        start, stage, kind = best
        if kind == FORWARD:
            microbatch = forwards[stage]
            forwards[stage] += 1
            end = start + table[FORWARD][stage]
            forward_end[(stage, microbatch)] = end
        elif kind == WEIGHT_GRAD:
            microbatch = weights[stage]
            weights[stage] += 1
            end = start + table[WEIGHT_GRAD][stage]
        else:
            microbatch = backwards[stage]
            backwards[stage] += 1
            end = start + table[backward_kind][stage]
            backward_end[(stage, microbatch)] = end
        free[stage] = end
        program[stage].append(Action(backward_kind if kind == "b" else kind, stage, microbatch))
        done += 1
    return program


def _choose(stage: int, p: int, m: int, limit: int, comm: float, split: bool, table: dict[str, list[float]],
            ahead: int, wait_fraction: float, forward_first: bool, forwards: list[int], backwards: list[int],
            weights: list[int], forward_end: dict, backward_end: dict, now: float) -> tuple[float, str] | None:
    """The next action of ``stage``'s rank (free at ``now``): (start time, "F", "b" or "W")."""
    options: list[tuple[float, int, str]] = []  # (start, priority, kind)
    k = backwards[stage]
    if k < forwards[stage]:
        ready = forward_end[(stage, k)] if stage == p - 1 else \
            (backward_end[(stage + 1, k)] + comm if (stage + 1, k) in backward_end else None)
        if ready is not None:
            options.append((max(now, ready), 1 if forward_first else 0, "b"))
    k = forwards[stage]
    held = k - (weights[stage] if split else backwards[stage])
    if k < m and held < limit and k - backwards[stage] < ahead:
        ready = 0.0 if stage == 0 else (forward_end[(stage - 1, k)] + comm if (stage - 1, k) in forward_end else None)
        if ready is not None:
            options.append((max(now, ready), 0 if forward_first else 1, "F"))
    if split and weights[stage] < backwards[stage]:
        due = min((start for start, _, kind in options), default=None)
        # run W now unless the next I or F is due within a fraction of it (then wait for that)
        if due is None or due - now > wait_fraction * table[WEIGHT_GRAD][stage] or held >= limit:
            options.append((now, 2, WEIGHT_GRAD))
    if not options:
        return None
    start, _, kind = min(options)
    return start, kind


def _evaluate(program: Program | Schedule, table: dict[str, list[float]], n_stages: int, m: int, comm: float,
              limit: int) -> tuple[float, Schedule] | None:
    schedule = program if isinstance(program, Schedule) else \
        Schedule(tuple(tuple(r) for r in program), n_stages, m, name="auto")
    try:
        result = simulate(schedule, costs=table, comm=comm)
    except ScheduleError:
        return None
    per_rank = [0] * schedule.n_ranks
    for stage, peak in enumerate(result.peak_activations):
        per_rank[schedule.placement[stage]] += peak
    if max(per_rank) > limit:
        return None
    return result.makespan, schedule


def _seeds(table: dict[str, list[float]], p: int, m: int, comm: float, limit: int,
           split: bool) -> list[tuple[float, Schedule]]:
    from . import SCHEDULES

    found = []
    for generator in SCHEDULES.values():
        try:
            schedule = generator(p, p, m)
        except (ValueError, TypeError):
            continue
        if schedule.is_streaming or schedule.placement != tuple(range(p)):
            continue
        if not split and any(a.kind in (INPUT_GRAD, WEIGHT_GRAD) for actions in schedule.ranks for a in actions):
            continue
        evaluated = _evaluate(schedule, table, p, m, comm, limit)
        if evaluated is not None:
            found.append(evaluated)
    return found


def _improve(best: tuple[float, Schedule], table: dict[str, list[float]], p: int, m: int, comm: float, limit: int,
             deadline: float) -> tuple[float, Schedule]:
    """Hill-climb over swaps of adjacent actions of one rank, first improvement, until none helps."""
    makespan, schedule = best
    program = [list(actions) for actions in schedule.ranks]
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for actions in program:
            for position in range(len(actions) - 1):
                a, b = actions[position], actions[position + 1]
                if (a.stage, a.microbatch) == (b.stage, b.microbatch) or a.kind == b.kind:
                    continue
                actions[position], actions[position + 1] = b, a
                evaluated = _evaluate(program, table, p, m, comm, limit)
                if evaluated is not None and evaluated[0] < makespan - 1e-9:
                    makespan, schedule = evaluated
                    improved = True
                else:
                    actions[position], actions[position + 1] = a, b
                if time.monotonic() >= deadline:
                    return makespan, schedule
    return makespan, schedule


def search(costs: Mapping[str, float | Sequence[float]], memory_limit: int | None = None, *, n_microbatches: int,
           n_stages: int | None = None, comm: float = 0.0, split: bool | None = None,
           budget_s: float = 2.0) -> Schedule:
    """The program for ``n_microbatches`` on one stage per rank with the smallest simulated
    makespan found, holding at most ``memory_limit`` micro-batches of activations per rank
    (default: as many as there are ranks, 1F1B's peak).

    ``costs`` maps ``F`` and ``B`` (or ``I`` and ``W``) to a duration or a list of per-stage
    durations (``n_stages`` says how many stages when every cost is a number); ``comm`` is the
    p2p latency between ranks. ``split`` (default: whether ``I`` and ``W`` are given) splits the
    backward into I and W (zero-bubble programs). ``budget_s`` bounds the local search. The result
    is a validated :class:`Schedule` named ``"auto"``, runnable like any other.
    """
    table, p = _table(costs, n_stages)
    m = n_microbatches
    if m < 1:
        raise ValueError(f"n_microbatches must be at least 1, got {m}")
    limit = p if memory_limit is None else int(memory_limit)
    if limit < 1:
        raise ValueError(f"memory_limit={memory_limit} must allow at least 1 micro-batch of activations per rank")
    if split is None:
        split = "I" in costs and "W" in costs
    deadline = time.monotonic() + budget_s
    found: list[tuple[float, Schedule]] = _seeds(table, p, m, comm, limit, split)
    aheads = sorted({min(limit, p - 1 + extra) for extra in range(0, limit + 1)} | {limit})
    for extra in aheads:
        for wait_fraction in ((0.0, 0.5, 1.0) if split else (0.0,)):
            for forward_first in (False, True):
                ahead = [max(1, min(limit, extra - stage + 1)) for stage in range(p)] if extra < limit else [limit] * p
                for shape in (ahead, [limit] * p):
                    program = _build(table, p, m, limit, comm, split, shape, wait_fraction, forward_first)
                    evaluated = _evaluate(program, table, p, m, comm, limit)
                    if evaluated is not None:
                        found.append(evaluated)
    if not found:
        raise ScheduleError(f"no program of {m} micro-batches on {p} stages holds at most {limit} per rank")
    found.sort(key=lambda entry: entry[0])
    best = found[0]
    for candidate in found[:3]:
        improved = _improve(candidate, table, p, m, comm, limit, deadline)
        if improved[0] < best[0] - 1e-9:
            best = improved
    makespan, schedule = best
    return Schedule(schedule.ranks, p, m, name="auto")
