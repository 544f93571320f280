"""Benchmark 6, scaling: sleeping stages (F = 10 ms, B = 20 ms, as in benchmark 2), step time as
the micro-batches grow (1 .. 32 at 4 stages) and as the stages grow (1 .. 8 processes at 8
micro-batches), gpipe and 1f1b, both libraries side by side, against the simulator's makespan.

One launch per number of processes; in it every point runs conveyor and torch alternated
(:func:`harness.alternate`). Points whose ideal step is long get fewer steps so that the whole
benchmark stays within a few minutes (the counts are in the table).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from conveyor.schedule import simulate

from . import charts
from .harness import QUICK, Plan, alternate, paired_ratios, pooled
from .ours import conveyor_step
from .report import Section, Table, ms, ratio
from .sleep_stages import measure_sleep
from .torch_pipelining import TORCH_SCHEDULES, torch_step
from .workloads import sleep_workload, sum_loss

__all__ = ["SCHEDULES", "MICROBATCHES", "STAGES", "worker", "run"]

SCHEDULES = ["gpipe", "1f1b"]
MICROBATCHES = [1, 2, 4, 8, 16, 32]  # at BASE_STAGES
STAGES = [1, 2, 4, 8]  # processes, one stage each, at BASE_MICROBATCHES
BASE_STAGES = 4
BASE_MICROBATCHES = 8
FORWARD_S, BACKWARD_S = 0.010, 0.020
QUICK_SCALE = 0.1  # --quick sleeps a tenth as long
BATCH = 32  # rows (enough for 32 micro-batches); the stages only sleep

STEPS = 20  # timed steps per contender and point ...
LONG_S = 0.35  # ... except where the ideal step is longer than this:
LONG_POINT_S = 4.0  # about this many seconds of timed steps per contender,
LONG_MIN_STEPS = 6  # but at least this many steps
ROUNDS = 2  # blocks per contender and point, alternated (1 untimed warm-up step each)

Point = tuple[str, int, int]  # (schedule, stages, micro-batches)


def points() -> list[Point]:
    """Every measured point: the micro-batch sweep at 4 stages, then the stage sweep at 8 micro-batches
    (the point both sweeps share is measured once)."""
    found = [(s, BASE_STAGES, m) for m in MICROBATCHES for s in SCHEDULES]
    found += [(s, p, BASE_MICROBATCHES) for p in STAGES for s in SCHEDULES if p != BASE_STAGES]
    return found


def torch_supports(schedule: str, stages: int, microbatches: int) -> str | None:
    """Why torch cannot run this point, or None."""
    if schedule == "1f1b" and microbatches < stages:
        return "Schedule1F1B needs at least as many micro-batches as stages"
    return None


def ideal(schedule: str, stages: int, microbatches: int, forward_s: float, backward_s: float) -> float:
    return simulate(schedule, stages, microbatches, {"F": forward_s, "B": backward_s}).makespan


def steps_for(seconds: float) -> int:
    """Timed steps per contender for a point whose ideal step takes ``seconds``."""
    if seconds <= LONG_S:
        return STEPS
    return max(LONG_MIN_STEPS, round(LONG_POINT_S / seconds))


def worker(rank: int, world: int, todo: list[tuple[Point, Plan]], forward_s: float,
           backward_s: float) -> dict[Point, Any] | None:
    """Every point of this world size: conveyor and torch alternated; step times on rank 0."""
    torch.set_num_threads(1)
    torch_group = dist.new_group(list(range(world)))
    results: dict[Point, Any] = {}
    for point, plan in todo:
        schedule, stages, microbatches = point
        a = sleep_workload(stages, forward_s, backward_s, batch=BATCH)
        ours, _ = conveyor_step(a.stages, schedule, microbatches, sum_loss, a.inputs, a.target)
        contenders = {"conveyor": ours}
        if torch_supports(*point) is None:
            b = sleep_workload(stages, forward_s, backward_s, batch=BATCH)
            contenders["torch"], _ = torch_step(b.stages, schedule, microbatches, sum_loss, b.inputs, b.target,
                                                group=torch_group)
        measured = alternate(contenders, plan)
        results[point] = {"times": measured.times, "foreign": measured.foreign, "redone": measured.redone}
    return results if rank == 0 else None


def run(plan: Plan, figures: Path) -> Section:
    """Run the benchmark and build its report section."""
    import conveyor

    started = time.perf_counter()
    quick = plan == QUICK
    scale = QUICK_SCALE if quick else 1.0
    forward_s, backward_s = FORWARD_S * scale, BACKWARD_S * scale
    sleeps = {s: measure_sleep(s) for s in (forward_s, backward_s)}
    plans: dict[Point, Plan] = {}
    for point in points():
        if quick:
            plans[point] = plan
        else:
            steps = steps_for(ideal(*point, forward_s, backward_s))
            plans[point] = replace(plan, rounds=ROUNDS, min_steps=steps, min_seconds=0.0, warmup=1)
    results: dict[Point, Any] = {}
    launches: dict[int, float] = {}
    for world in sorted({p[1] for p in points()}):
        todo = [(point, plans[point]) for point in points() if point[1] == world]
        began = time.perf_counter()
        results.update(conveyor.launch(worker, world, args=(todo, forward_s, backward_s), threads_per_rank=1,
                                       timeout=900)[0])
        launches[world] = time.perf_counter() - began

    section = Section("scaling", "6. Scaling with micro-batches and stages (sleeping stages)")
    section.text.append(
        f"Sleeping stages as in benchmark 2 (F = {ms(forward_s)} ms, B = {ms(backward_s)} ms per stage and "
        f"micro-batch; one stage per process, 1 thread each; {BATCH} rows of width 4). Left: {BASE_STAGES} stages, "
        f"micro-batches {', '.join(map(str, MICROBATCHES))}. Right: {BASE_MICROBATCHES} micro-batches, "
        f"{', '.join(map(str, STAGES))} processes (8 processes on this machine's cores is fine: the stages sleep). "
        "*sim* is `conveyor.schedule.simulate`'s makespan with those costs and free messages, (m + p - 1)(F + B) "
        "for both schedules; *calibrated* uses what `time.sleep` really took here "
        f"({ms(sleeps[forward_s])} and {ms(sleeps[backward_s])} ms). Per point conveyor and torch run in the same "
        "processes, alternated block by block, one untimed step per block; medians over all timed steps. "
        + ("Quick run: sleeps a tenth as long, one block of one timed step per point." if quick else
           f"{ROUNDS} blocks each; {STEPS} timed steps per contender and point, fewer where the ideal step exceeds "
           f"{ms(LONG_S)} ms (about {LONG_POINT_S:g} s of timed steps, at least {LONG_MIN_STEPS}), as the *steps* "
           "column says."))
    table = Table(["sweep", "stages", "micro-batches", "schedule", "sim ms", "calibrated", "ours median",
                   "ours / sim", "torch median", "torch / sim", "ours / torch (paired)", "steps (ours, torch)"])
    series: dict[str, dict[str, list[float | None]]] = {"m": {}, "p": {}}
    ratios: dict[str, dict[str, list[float | None]]] = {"m": {}, "p": {}}
    overall: dict[str, dict[str, list[float]]] = {s: {"conveyor": [], "torch": [], "paired": []} for s in SCHEDULES}
    unsupported: set[str] = set()
    for sweep, xs in (("m", MICROBATCHES), ("p", STAGES)):
        series[sweep]["simulator (both schedules)"] = []
        series[sweep]["simulator, calibrated sleeps"] = []
        ratios[sweep]["simulator, calibrated sleeps"] = []
        for schedule in SCHEDULES:
            for x in xs:
                point = (schedule, BASE_STAGES, x) if sweep == "m" else (schedule, x, BASE_MICROBATCHES)
                data = results[point]
                times = data["times"]
                first = sweep == "m" or x != BASE_STAGES  # the shared point counts once
                if first:
                    section.foreign += data["foreign"]
                    section.redone += data["redone"]
                sim = ideal(*point, forward_s, backward_s)
                calibrated = ideal(*point, sleeps[forward_s], sleeps[backward_s])
                ours = pooled(times["conveyor"])
                row: list[str] = ["micro-batches" if sweep == "m" else "stages", str(point[1]), str(point[2]),
                                  schedule, ms(sim), ms(calibrated), ms(ours.median), ratio(ours.median / sim)]
                series[sweep].setdefault(f"conveyor {schedule}", []).append(ours.median)
                ratios[sweep].setdefault(f"conveyor {schedule}", []).append(ours.median / sim)
                if first:
                    overall[schedule]["conveyor"].append(ours.median / sim)
                if "torch" in times:
                    theirs = pooled(times["torch"])
                    paired = paired_ratios(times["conveyor"], times["torch"])
                    row += [ms(theirs.median), ratio(theirs.median / sim), ratio(paired.median),
                            f"{ours.n}, {theirs.n}"]
                    series[sweep].setdefault(f"torch {schedule}", []).append(theirs.median)
                    ratios[sweep].setdefault(f"torch {schedule}", []).append(theirs.median / sim)
                    if first:
                        overall[schedule]["torch"].append(theirs.median / sim)
                        overall[schedule]["paired"].append(paired.median)
                else:
                    unsupported.add(f"{TORCH_SCHEDULES[schedule]} at {point[2]} micro-batches on {point[1]} "
                                    f"stages ({torch_supports(*point)})")
                    row += ["n/a", "n/a", "n/a", f"{ours.n}, -"]
                    series[sweep].setdefault(f"torch {schedule}", []).append(None)
                    ratios[sweep].setdefault(f"torch {schedule}", []).append(None)
                table.rows.append(row)
                if schedule == SCHEDULES[0]:
                    series[sweep]["simulator (both schedules)"].append(sim)
                    series[sweep]["simulator, calibrated sleeps"].append(calibrated)
                    ratios[sweep]["simulator, calibrated sleeps"].append(calibrated / sim)
    section.tables.append(table)
    section.short = "6. scaling"
    for schedule, found in overall.items():
        n = len(found["conveyor"])
        section.headline.append([
            f"{schedule}: step / sim, median of {n} points (ours) / {len(found['torch'])} (torch)",
            ratio(statistics.median(found["conveyor"])),
            ratio(statistics.median(found["torch"])) if found["torch"] else "n/a",
            f"{ratio(statistics.median(found['paired']))}x the time" if found["paired"] else ""])
    if unsupported:
        section.notes.append("torch n/a: " + "; ".join(sorted(unsupported)) + ".")
    section.notes.append(
        "*ours / sim*, *torch / sim*: median step / the simulator's makespan; *paired*: per round, median of "
        "ours / median of torch's, median over rounds. The gap to *sim* is per-step runtime work and message "
        "latency on the critical path, plus `time.sleep`'s overshoot (the calibrated column). Summary rows: "
        "median over the distinct points (the 4-stage, 8-micro-batch point is in both sweeps, counted once). "
        "Launch and measurement time per process count: "
        + ", ".join(f"{w} process{'es' if w > 1 else ''} {launches[w]:.0f} s" for w in sorted(launches)) + ".")
    ms_series = {sweep: {k: [None if v is None else v * 1e3 for v in vs] for k, vs in found.items()}
                 for sweep, found in series.items()}
    figure = charts.scaling_lines([
        (f"micro-batches ({BASE_STAGES} stages)", "step ms (median)", MICROBATCHES, ms_series["m"]),
        (f"stages = processes ({BASE_MICROBATCHES} micro-batches)", "step ms (median)", STAGES, ms_series["p"]),
        (f"micro-batches ({BASE_STAGES} stages)", "step / sim", MICROBATCHES, ratios["m"]),
        (f"stages = processes ({BASE_MICROBATCHES} micro-batches)", "step / sim", STAGES, ratios["p"]),
    ], figures / "scaling.png")
    if figure is not None:
        section.figures.append(figure)
    section.seconds = time.perf_counter() - started
    return section
