"""What a profiled block costs inside a running pipeline: one short traced run, compared with the profile.

The profile times each block alone, back to back. Inside a pipeline the same work ran slower on
this 2-core VM (docs/planning.md, sections 2 and 4): with 2 ranks the 16k head's backward took
1.2-1.3x its profiled time and the optimizer step after a step 1.3-3x, which made 2-rank
predictions 10-25 % too fast. Neither accumulating into ``.grad`` nor other micro-batches run
between a forward and its backward reproduced it in one process, so instead of guessing the cause
the planner measures it: :func:`calibrate` runs the workload as a 1F1B pipeline on the planned
ranks for a few steps with ``runner.trace`` on and times each rank's optimizer step, and
:func:`in_stream_factors` divides, per action kind, the traced compute (``end - start``, the wait
for a peer excluded) by what the cost model prices for the same actions. The factors are stored
in ``Profile.in_stream`` and ``costs.stage_costs`` / ``stage_updates`` multiply by them, so every
search (synchronous, asynchronous, the zero-bubble schedule search) gets them.

Where ranks outnumber the cores the profile is in CPU seconds and the sharing is modelled
(``costs.shared_core_makespan``); a traced wall-clock action then includes the time other ranks
held its core, so F and B are not calibrated: the optimizer step is (timed in the thread's CPU
seconds), and ``S``, the run's measured step over its predicted one (:func:`shared_core_factor`),
stretches synchronous candidates' processor-sharing makespans.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from ..workloads import WorkloadSpec
from .costs import action_costs, time_balanced_split
from .profile import Profile, oversubscribed

__all__ = ["calibrate", "calibration_layout", "in_stream_factors", "shared_core_factor"]

_ACTION = re.compile(r"(\d+)([A-Z])(\d+)$")


def calibration_layout(profile: Profile, n_ranks: int, batch_size: int,
                       n_microbatches: int | None = None) -> tuple[tuple[int, ...], int]:
    """The time-balanced split into ``n_ranks`` stages (fewer when there are fewer blocks) and the
    micro-batch count: ``n_microbatches`` (the plan's pick: the factors are measured at the rows
    that matter most, as per-row costs are not one line), else the smallest power of two at least
    ``n_ranks`` that divides the batch, else 1."""
    n_stages = max(1, min(n_ranks, profile.n_blocks))
    m = n_microbatches or next((count for count in (1 << k for k in range(batch_size.bit_length()))
                                if count >= n_stages and batch_size % count == 0), 1)
    return time_balanced_split(profile, n_stages, batch_size / m), m


def _worker(rank: int, world_size: int, spec: WorkloadSpec, sizes: tuple[int, ...], n_microbatches: int,
            batch_size: int, steps: int, cpu_time: bool) -> dict[str, Any]:
    from .verify import candidate_runner, timed_steps

    workload, runner, optimizer = candidate_runner(spec, "1f1b", sizes, n_microbatches, batch_size)
    with runner:
        timed = timed_steps(workload, runner, optimizer, batch_size, steps,
                            update_clock=time.thread_time if cpu_time else time.perf_counter)
    actions: dict[str, list[float]] = defaultdict(list)
    for step in timed:
        for event in step.trace:
            match = _ACTION.match(event.action)
            if match:
                actions[f"{match.group(1)}{match.group(2)}"].append(event.end - event.start)
    return {"actions": dict(actions), "update": [t.update_s for t in timed],
            "spans": [(t.start, t.end) for t in timed]}


def in_stream_factors(per_rank: Sequence[dict[str, Any]], profile: Profile, sizes: Sequence[int],
                      rows: float, placement: Sequence[int]) -> dict[str, float]:
    """Per action kind, the traced seconds over the priced ones (medians per stage, summed over
    stages); ``U``: the ranks' median optimizer steps over their stages' priced updates."""
    priced = action_costs(profile, sizes, rows)
    measured: dict[str, list[float]] = defaultdict(list)
    for rank in per_rank:
        for key, seconds in rank["actions"].items():
            measured[key].extend(seconds)
    factors: dict[str, float] = {}
    for kind in ("F", "B"):
        model = getattr(priced, kind)
        stages = [s for s in range(len(sizes)) if f"{s}{kind}" in measured and model[s] > 0]
        if stages:
            factors[kind] = sum(statistics.median(measured[f"{s}{kind}"]) for s in stages) / \
                sum(model[s] for s in stages)
    per_rank_update = defaultdict(float)
    for stage, rank in enumerate(placement):
        per_rank_update[rank] += priced.U[stage]
    ranks = [r for r, rank in enumerate(per_rank) if rank["update"] and per_rank_update[r] > 0]
    if ranks:
        factors["U"] = sum(statistics.median(per_rank[r]["update"]) for r in ranks) / \
            sum(per_rank_update[r] for r in ranks)
    return factors


def calibrate(profile: Profile, spec: WorkloadSpec, n_ranks: int, batch_size: int, *,
              n_microbatches: int | None = None, steps: int = 3, timeout: float = 600.0) -> dict[str, float]:
    """Run ``spec``'s workload as a 1F1B pipeline on ``n_ranks`` local processes for ``steps``
    traced steps (after one warm-up) with ``n_microbatches`` (see :func:`calibration_layout`) and
    return the in-stream factors (``Profile.in_stream``: ``F``, ``B`` (which I and W take: 1F1B runs
    whole backwards) and ``U``). With ranks outnumbering the cores (a CPU-seconds profile): ``U``
    and ``S`` (:func:`shared_core_factor`), run with at least a micro-batch per rank."""
    from ..launch import launch

    profile = replace(profile, in_stream={})  # priced as profiled
    threads = max(1, (profile.cores or 1) // n_ranks)
    cpu_time = oversubscribed(n_ranks, threads)
    if cpu_time and n_microbatches is not None:  # ranks sharing cores: at least a micro-batch per rank (see S)
        n_microbatches = max(n_microbatches, calibration_layout(profile, n_ranks, batch_size)[1])
    sizes, m = calibration_layout(profile, n_ranks, batch_size, n_microbatches)
    if len(sizes) < 2:
        return {}
    per_rank = launch(_worker, len(sizes), timeout=timeout, threads_per_rank=threads,
                      args=(spec, sizes, m, batch_size, steps, cpu_time))
    factors = in_stream_factors(per_rank, profile, sizes, batch_size / m, list(range(len(sizes))))
    if profile.clock == "cpu" or cpu_time:
        factors = {kind: value for kind, value in factors.items() if kind == "U"}
        factors["S"] = shared_core_factor(per_rank, replace(profile, in_stream=factors), sizes, m, batch_size,
                                          n_ranks)
    return factors


def shared_core_factor(per_rank: Sequence[dict[str, Any]], profile: Profile, sizes: tuple[int, ...], m: int,
                       batch_size: int, n_ranks: int) -> float:
    """Ranks sharing cores: the calibration run's measured step (median over steps of the first
    rank's start to the last rank's end, optimizer step included) over the step the planner predicts
    for the same 1F1B layout, which stretches the processor-sharing makespan
    (``costs.shared_core_makespan``, an ideal scheduler) of every synchronous candidate."""
    from .search import plan

    steps = len(per_rank[0]["spans"])
    measured = statistics.median(max(rank["spans"][i][1] for rank in per_rank) -
                                 min(rank["spans"][i][0] for rank in per_rank) for i in range(steps))
    predicted = next((c.step_s for c in plan(profile, n_ranks, batch_size=batch_size, schedules=["1f1b"],
                                             microbatches=[m], reshare=True).candidates if c.sizes == sizes), None)
    return measured / predicted if predicted else 1.0
