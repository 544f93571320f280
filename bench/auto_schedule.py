"""Benchmark: ``PipelineRunner(schedule="auto")`` against 1F1B and ZB-H1 on sleeping stages whose
costs differ per stage (4 ranks, 8 micro-batches, at 1F1B's activation memory).

Stages have separate input-grad and weight-grad nodes (``SplitSleepStage``); stage 0's input
needs no gradient, so its I does nothing. The auto runner profiles its stages during its first
(warm-up) step and runs the program ``conveyor.schedule.search`` found; all three run in the
same processes, alternated. *Simulated* prices each program with the auto runner's profiled
costs and p2p latency (the same numbers for all three).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from .harness import Plan, alternate, paired_ratios, pooled
from .report import Section, Table, ms, ratio
from .sleep_stages import SplitSleepStage
from .workloads import sum_loss

__all__ = ["CASES", "worker", "run"]

N_RANKS = 4
N_MICROBATCHES = 8
CONTENDERS = ("1f1b", "zb-h1", "auto")
# case: (F, I, W) seconds per stage
CASES: dict[str, list[tuple[float, float, float]]] = {
    "last stage 2x": [(0.010, 0.010, 0.010)] * 3 + [(0.020, 0.020, 0.020)],
    "last stage W 3x": [(0.010, 0.010, 0.010)] * 3 + [(0.010, 0.010, 0.030)],
    "stage 1 2x": [(0.010, 0.010, 0.010), (0.020, 0.020, 0.020), (0.010, 0.010, 0.010), (0.010, 0.010, 0.010)],
}


def worker(rank: int, world: int, plan: Plan, cases: list[str]) -> dict[str, Any] | None:
    import conveyor

    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    inputs, target = torch.ones(8, 4), torch.ones(8, 4)
    for case in cases:
        runners = {}
        for name in CONTENDERS:
            stages = [SplitSleepStage(i, f, i_s, w_s) for i, (f, i_s, w_s) in enumerate(CASES[case])]
            runners[name] = conveyor.PipelineRunner(conveyor.pipeline(stages), schedule=name,
                                                    n_microbatches=N_MICROBATCHES, loss_fn=sum_loss, device="cpu")
        runners["auto"].step(inputs, target=target)  # profiles and chooses

        def step_of(runner: Any) -> Any:
            return lambda: runner.step(inputs, target=target)

        measured = alternate({name: step_of(runner) for name, runner in runners.items()}, plan)
        results[case] = {"times": measured.times, "foreign": measured.foreign, "redone": measured.redone,
                         "profile": runners["auto"].auto_profile,
                         "programs": {name: runner.schedule.to_text() for name, runner in runners.items()}}
        for runner in runners.values():
            runner.close()
    return results if rank == 0 else None


def _gain(value: float, best_hand: str, programs: dict[str, str]) -> str:
    same = [name for name in ("1f1b", "zb-h1") if programs[name] == programs["auto"]]
    return f"{ratio(value)} vs {best_hand}" + (f" (the same program as {same[0]}: noise)" if same else "")


def run(plan: Plan, figures: Path) -> Section:
    """Run the benchmark and build its report section."""
    import conveyor
    from conveyor.schedule import Schedule, simulate

    started = time.perf_counter()
    cases = list(CASES) if plan.min_steps > 1 else list(CASES)[:1]  # --quick: one case
    results = conveyor.launch(worker, N_RANKS, args=(plan, cases), threads_per_rank=1, timeout=1800)[0]
    section = Section("auto", "10. The automatic schedule (sleeping stages, unequal costs, 4 ranks, 8 micro-batches)",
                      short="auto schedule")
    section.text.append(
        "`PipelineRunner(schedule=\"auto\")` (default memory limit: 4 micro-batches per rank, 1F1B's) against "
        "1F1B and ZB-H1 in the same processes, alternated. Stages sleep F, I and W (separate autograd nodes; "
        "stage 0's I does nothing, its input needing no gradient). *Simulated* prices each program with the "
        "auto runner's own profile (its F, I, W per stage and p2p latency), the same numbers for all three; "
        "*auto / best hand-written* is per round, median over rounds.")
    table = Table(["case (F, I, W ms per stage)", "schedule", "simulated ms", "median ms", "min", "max",
                   "measured / simulated", "auto / best hand-written (paired)"])
    for case in cases:
        data, costs = results[case], CASES[case]
        profile = data["profile"]
        table_costs = dict(profile["costs"])
        table_costs["B"] = [i + w for i, w in zip(table_costs["I"], table_costs["W"])]  # 1F1B's whole backward
        label = f"{case}: " + " ".join(f"({f * 1e3:g},{i * 1e3:g},{w * 1e3:g})" for f, i, w in costs)
        simulated = {name: simulate(Schedule.from_text(text), costs=table_costs, comm=profile["comm"]).makespan
                     for name, text in data["programs"].items()}
        best_hand = min(("1f1b", "zb-h1"), key=lambda name: pooled(data["times"][name]).median)
        gain = paired_ratios(data["times"]["auto"], data["times"][best_hand])
        for name in CONTENDERS:
            summary = pooled(data["times"][name])
            table.rows.append([label if name == CONTENDERS[0] else "", name, ms(simulated[name]), ms(summary.median),
                               ms(summary.min), ms(summary.max), ratio(summary.median / simulated[name]),
                               _gain(gain.median, best_hand, data["programs"]) if name == "auto" else ""])
        section.notes.append(f"{case}: auto's program\n\n```\n{data['programs']['auto']}```\nprofiled costs (ms): "
                             + ", ".join(f"{kind} " + "/".join(f"{v * 1e3:.1f}" for v in values)
                                         for kind, values in profile["costs"].items())
                             + f"; p2p latency {profile['comm'] * 1e3:.2f} ms.")
    section.foreign = [share for data in results.values() for share in data["foreign"]]
    section.redone = sum(data["redone"] for data in results.values())
    section.tables.append(table)
    section.seconds = time.perf_counter() - started
    return section
