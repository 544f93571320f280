"""Timing inside the worker processes: contenders alternated block by block, every step timed
across all ranks; and the statistics taken from those times afterwards.

A *contender* is a step function every rank calls (a no-op on ranks that take no part). One
timed step is::

    all ranks: all_reduce(go)            # a barrier that also carries rank 0's "one more?"
    each rank: start = perf_counter(); step(); end = perf_counter()
    step time = max(end over ranks) - min(start over ranks)

``perf_counter`` is CLOCK_MONOTONIC on Linux, shared by the processes of one host, so starts and
ends of different ranks compare directly.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = ["Plan", "QUICK", "FULL", "Measured", "Summary", "alternate", "busy_cpu_seconds", "summarise",
           "paired_ratios", "pooled", "round_medians"]

Step = Callable[[], object]


@dataclass(frozen=True)
class Plan:
    """How much to measure: ``rounds`` blocks per contender, alternated, together at least
    ``min_steps`` steps and ``min_seconds`` seconds per contender, after ``warmup`` untimed steps
    per block."""

    rounds: int
    min_steps: int
    min_seconds: float
    warmup: int
    max_steps_per_block: int = 2000
    timelines: bool = True  # draw per-step timeline figures (slow to render)
    max_foreign: float = 0.25  # re-measure a block in which other processes used more of the CPUs ...
    max_redo: int = 2  # ... at most this many times


QUICK = Plan(rounds=1, min_steps=1, min_seconds=0.0, warmup=1, timelines=False, max_redo=0)
FULL = Plan(rounds=5, min_steps=25, min_seconds=2.5, warmup=2, max_redo=1)


def _go(flag: bool, group: dist.ProcessGroup | None) -> bool:
    """Rank 0's decision, known to every rank once all have arrived (a barrier)."""
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return bool(tensor.item())


def busy_cpu_seconds() -> float | None:
    """CPU-seconds the whole machine has spent busy since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _block(step: Step, plan: Plan, group: dist.ProcessGroup | None) -> tuple[list[float], float | None]:
    """Warm-up, then timed steps until rank 0 has seen enough. On rank 0: the step times and the
    share of the machine's CPUs that other processes kept busy meanwhile (None if unknown)."""
    rank = dist.get_rank(group)
    for _ in range(plan.warmup):
        _go(True, group)
        step()
    machine_before, own_before, wall_before = busy_cpu_seconds(), time.process_time(), time.perf_counter()
    need_steps = math.ceil(plan.min_steps / plan.rounds)
    need_seconds = plan.min_seconds / plan.rounds
    spans: list[tuple[float, float]] = []
    local_total = 0.0
    while True:
        more = len(spans) < need_steps or local_total < need_seconds
        if not _go(rank == 0 and more and len(spans) < plan.max_steps_per_block, group):
            break
        start = time.perf_counter()
        step()
        end = time.perf_counter()
        spans.append((start, end))
        local_total += end - start
    machine_after, own = busy_cpu_seconds(), time.process_time() - own_before
    wall = time.perf_counter() - wall_before
    gathered: list[tuple[list[tuple[float, float]], float] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, (spans, own), group=group)
    if rank != 0:
        return [], None
    per_rank = [g[0] for g in gathered if g is not None]
    times = [max(r[i][1] for r in per_rank) - min(r[i][0] for r in per_rank) for i in range(len(spans))]
    foreign = None
    if machine_before is not None and machine_after is not None and wall > 0:
        ours = sum(g[1] for g in gathered if g is not None)
        foreign = max(0.0, (machine_after - machine_before - ours) / (wall * (os.cpu_count() or 1)))
    return times, foreign


@dataclass
class Measured:
    """``times[name]``: step times per round; ``foreign``: per kept block, the share of the machine's
    CPUs that processes other than the benchmark's kept busy (other jobs on a shared machine);
    ``redone``: blocks measured again because that share was over ``Plan.max_foreign``."""

    times: dict[str, list[list[float]]] = field(default_factory=dict)
    foreign: list[float] = field(default_factory=list)
    redone: int = 0


def alternate(contenders: dict[str, Step], plan: Plan, group: dist.ProcessGroup | None = None) -> Measured:
    """Run every contender in ``plan.rounds`` blocks, rotating the order each round.

    A block during which other processes kept more than ``plan.max_foreign`` of the CPUs busy is
    measured again (up to ``plan.max_redo`` times). Returns the measurements on rank 0 (an empty
    :class:`Measured` elsewhere).
    """
    names = list(contenders)
    measured = Measured({name: [] for name in names})
    for round_index in range(plan.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            for attempt in range(plan.max_redo + 1):
                times, foreign = _block(contenders[name], plan, group)
                busy = foreign is not None and foreign > plan.max_foreign
                if not _go(busy and attempt < plan.max_redo, group):
                    break
                measured.redone += 1
            measured.times[name].append(times)
            if foreign is not None:
                measured.foreign.append(foreign)
    return measured if dist.get_rank(group) == 0 else Measured()


@dataclass(frozen=True)
class Summary:
    """Median, min and max of a sample, and its size."""

    median: float
    min: float
    max: float
    n: int

    def scaled(self, factor: float) -> Summary:
        return Summary(self.median * factor, self.min * factor, self.max * factor, self.n)


def summarise(values: Sequence[float]) -> Summary:
    """The :class:`Summary` of ``values`` (which must not be empty)."""
    return Summary(statistics.median(values), min(values), max(values), len(values))


def round_medians(rounds: Sequence[Sequence[float]]) -> list[float]:
    """The median of each round's step times."""
    return [statistics.median(r) for r in rounds]


def paired_ratios(numerator: Sequence[Sequence[float]], denominator: Sequence[Sequence[float]]) -> Summary:
    """Per round, median(numerator) / median(denominator); summarised over rounds."""
    return summarise([a / b for a, b in zip(round_medians(numerator), round_medians(denominator))])


def pooled(rounds: Sequence[Sequence[float]]) -> Summary:
    """Summary of all step times of all rounds."""
    return summarise([t for r in rounds for t in r])
