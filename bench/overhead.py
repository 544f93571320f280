"""Benchmark 1, runtime overhead: 4 stages on 4 processes, 8 micro-batches, stages that do no work
(``x * w`` on a (8, 4) tensor): what a step costs is the runtime itself: scheduling, messages,
autograd bookkeeping."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from conveyor.schedule import simulate

from . import charts
from .harness import Measured, Plan, alternate, paired_ratios, pooled
from .ours import conveyor_step
from .report import Section, Table, ms, ratio, summary_cells
from .torch_pipelining import TORCH_SCHEDULES, torch_step
from .workloads import overhead_workload

__all__ = ["SCHEDULES", "worker", "run"]

N_RANKS = 4
N_MICROBATCHES = 8
SCHEDULES = ["1f1b", "gpipe"]


def worker(rank: int, world: int, schedules: list[str], plan: Plan) -> dict[str, Measured] | None:
    """Per schedule, conveyor and torch alternated: their step times (rank 0)."""
    torch.set_num_threads(1)
    torch_group = dist.new_group(list(range(world)))
    results = {}
    for name in schedules:
        a, b = overhead_workload(world), overhead_workload(world)
        ours, _ = conveyor_step(a.stages, name, N_MICROBATCHES, a.loss_fn, a.inputs, a.target)
        reference, _ = torch_step(b.stages, name, N_MICROBATCHES, b.loss_fn, b.inputs, b.target, group=torch_group)
        results[name] = alternate({"conveyor": ours, "torch": reference}, plan)
    return results if rank == 0 else None


def run(plan: Plan, figures: Path, schedules: list[str] | None = None) -> Section:
    """Run the benchmark and build its report section."""
    import conveyor

    schedules = schedules or SCHEDULES
    started = time.perf_counter()
    results = conveyor.launch(worker, N_RANKS, args=(schedules, plan), threads_per_rank=1, timeout=900)[0]
    section = Section("overhead", "1. Runtime overhead (stages that do no work, 4 ranks, 8 micro-batches)")
    section.text.append(
        "Each stage is `x * w` (one scalar parameter, so every stage is differentiable) on an (8, 4) batch cut "
        "into 8 micro-batches of one row; 4 processes share the machine's cores, 1 thread each. The step "
        "time is all runtime: scheduling, 48 messages (8 micro-batches x 3 links x forward and backward), "
        "autograd bookkeeping, the loss.")
    table = Table(["schedule", "torch class", "ours median ms", "min", "max", "torch median ms", "min", "max",
                   "ours / torch (paired)", "min", "max", "ours ms per hop", "torch ms per hop"])
    chart: list[tuple[str, float, float, float]] = []
    for name in schedules:
        times = results[name].times
        section.foreign += results[name].foreign
        section.redone += results[name].redone
        ours, theirs = pooled(times["conveyor"]), pooled(times["torch"])
        paired = paired_ratios(times["conveyor"], times["torch"])
        hops = simulate(name, N_RANKS, N_MICROBATCHES, {"F": 0.0, "B": 0.0}, comm=1.0).makespan
        table.rows.append([name, TORCH_SCHEDULES[name], *summary_cells(ours), *summary_cells(theirs),
                           *summary_cells(paired, "ratio"), ms(ours.median / hops), ms(theirs.median / hops)])
        section.headline.append([f"{name}: ms per step (median)", ms(ours.median), ms(theirs.median),
                                 f"{ratio(paired.median)}x the time"])
        chart += [(f"conveyor {name}", ours.median, ours.min, ours.max),
                  (f"torch {name}", theirs.median, theirs.min, theirs.max)]
    section.tables.append(table)
    section.short = "1. overhead"
    section.notes.append(
        "*ms per hop*: the median step divided by the number of messages on the schedule's critical path "
        f"(simulated with free compute and unit message time: {', '.join(schedules)}), a rough per-message cost "
        "that also carries the per-action work.")
    figure = charts.time_bars(chart, figures / "overhead.png", "ms per step (median, min-max)")
    if figure is not None:
        section.figures.append(figure)
    section.seconds = time.perf_counter() - started
    return section
