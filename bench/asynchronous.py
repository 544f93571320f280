"""Benchmark 7, asynchronous pipelines: sleeping stages, time per micro-batch.

* PipeDream vs 1F1B, 4 stages (F = 10 ms, B = 20 ms each): 1F1B flushes after every 8
  micro-batches, PipeDream streams without flushing. Theory: 1F1B spends the simulator's
  makespan / 8 per micro-batch (41.25 ms), PipeDream's steady state is F + B = 30 ms.
* 1F1B-RR: 3 stages whose first is twice as slow (F = 20/10/10 ms, B = 40/20/20 ms), PipeDream
  on 3 ranks ([1, 1, 1], bottleneck 60 ms a micro-batch) against the slow stage replicated on a
  fourth rank ([2, 1, 1], 30 ms a micro-batch in theory).

Steady state: the median interval between consecutive micro-batch losses on the last stage over
the middle half of a stream; *whole run* includes one fill and drain (1F1B: every step's).
Theory ignores that the replicas of a stage wait for each other at every update (their gradients
are summed before either steps), which couples them: replica 1's micro-batch reaches the
replicas' shared update one downstream cycle after replica 0's.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .harness import Plan, summarise
from .report import Section, Table, ms, ratio
from .sleep_stages import measure_sleep

__all__ = ["run", "worker"]

N_MICROBATCHES = 8


def _pipe(costs: list[tuple[float, float]]) -> Any:
    """Sleeping stages; stage 0's input needs no gradient, so its whole backward sleeps on the
    weight path (otherwise half of it would never run)."""
    import conveyor
    from conveyor.testing import SleepStage

    return conveyor.pipeline([SleepStage(f, 0.0, b) if index == 0 else SleepStage(f, b / 2, b / 2)
                              for index, (f, b) in enumerate(costs)])


def _batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(N_MICROBATCHES, 2), torch.zeros(N_MICROBATCHES, 2)) for _ in range(n)]


def _stream(runner: Any, n_batches: int) -> tuple[float, list[float]]:
    """(seconds for the whole stream, loss timestamps on this rank)."""
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.0)
    stamps: list[float] = []
    start = time.perf_counter()
    for _ in runner.stream(_batches(n_batches), optimizer):
        stamps.append(time.perf_counter())
    return time.perf_counter() - start, stamps


def _steps(runner: Any, n_batches: int) -> float:
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.0)
    start = time.perf_counter()
    for inputs, target in _batches(n_batches):
        optimizer.zero_grad()
        runner.step(inputs, target=target)
        optimizer.step()
    return time.perf_counter() - start


def _steady(stamps: list[float]) -> float:
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    quarter = len(intervals) // 4
    return statistics.median(intervals[quarter:len(intervals) - quarter] or intervals)


def worker(rank: int, world: int, plan: Plan, n_batches: int) -> dict[str, list[float]] | None:
    """Rounds alternating the four contenders; per round, seconds per micro-batch of each."""
    import conveyor
    from conveyor.testing import sleep_loss

    torch.set_num_threads(1)
    even = [(0.010, 0.020)] * 4
    slow_first = [(0.020, 0.040), (0.010, 0.020), (0.010, 0.020)]
    three = dist.new_group([0, 1, 2])
    runners = {
        "1f1b": conveyor.PipelineRunner(_pipe(even), schedule="1f1b", n_microbatches=N_MICROBATCHES,
                                        loss_fn=sleep_loss),
        "pipedream": conveyor.PipelineRunner(_pipe(even), schedule="pipedream", n_microbatches=N_MICROBATCHES,
                                             loss_fn=sleep_loss),
        "replicated": conveyor.PipelineRunner(_pipe(slow_first), schedule="pipedream", n_microbatches=N_MICROBATCHES,
                                              loss_fn=sleep_loss, replicas=[2, 1, 1]),
        "replicated+1": conveyor.PipelineRunner(_pipe(slow_first), schedule="pipedream",
                                                n_microbatches=N_MICROBATCHES, loss_fn=sleep_loss, replicas=[2, 1, 1],
                                                admitted=3),
    }
    if rank < 3:
        runners["plain"] = conveyor.PipelineRunner(_pipe(slow_first), schedule="pipedream", group=three,
                                                   n_microbatches=N_MICROBATCHES, loss_fn=sleep_loss)
    results: dict[str, list[float]] = {key: [] for key in ("1f1b", "pipedream", "pipedream steady", "plain",
                                                           "plain steady", "replicated", "replicated steady",
                                                           "replicated+1", "replicated+1 steady")}
    total = n_batches * N_MICROBATCHES
    warmup_rounds = 1 if plan.min_steps > 1 else 0
    for index in range(warmup_rounds + plan.rounds):
        dist.barrier()
        round_results = {"1f1b": _steps(runners["1f1b"], n_batches) / total}
        dist.barrier()
        seconds, stamps = _stream(runners["pipedream"], n_batches)
        round_results.update({"pipedream": seconds / total, "pipedream steady": _steady(stamps) if stamps else 0})
        dist.barrier()
        if rank < 3:
            seconds, stamps = _stream(runners["plain"], n_batches)
            round_results.update({"plain": seconds / total, "plain steady": _steady(stamps) if stamps else 0})
        dist.barrier()
        for key in ("replicated", "replicated+1"):
            dist.barrier()
            seconds, stamps = _stream(runners[key], n_batches)
            round_results.update({key: seconds / total, f"{key} steady": _steady(stamps) if stamps else 0})
        gathered: list[dict | None] = [None] * world
        dist.all_gather_object(gathered, round_results)
        if index >= warmup_rounds:
            last_four, last_three = gathered[3] or {}, gathered[2] or {}
            for key in ("1f1b", "pipedream", "pipedream steady", "replicated", "replicated steady", "replicated+1",
                        "replicated+1 steady"):
                results[key].append(last_four[key])
            for key in ("plain", "plain steady"):
                results[key].append(last_three[key])
    return results if rank == 0 else None


def run(plan: Plan, figures: Path) -> Section:
    """Run the benchmark and build its report section."""
    import conveyor
    from conveyor.schedule import simulate

    started = time.perf_counter()
    n_batches = 1 if plan.min_steps <= 1 else 6
    sleeps = {s: measure_sleep(s) for s in (0.010, 0.020, 0.040)}
    data = conveyor.launch(worker, 4, args=(plan, n_batches), threads_per_rank=1, timeout=1200)[0]
    cal = {"F": sleeps[0.010], "B": 2 * sleeps[0.010]}  # a backward is two sleeps of B/2 (stage 0: one of B)
    slow = {"F": [sleeps[0.020], sleeps[0.010], sleeps[0.010]], "B": [sleeps[0.040]] + [2 * sleeps[0.010]] * 2}

    def steady(**options: Any) -> float:  # the simulator's time per micro-batch of a long stream
        short, long = (simulate("pipedream", 3, m, slow, **options).makespan for m in (48, 96))
        return (long - short) / 48

    theory = {
        "1f1b": simulate("1f1b", 4, N_MICROBATCHES, cal).makespan / N_MICROBATCHES,
        "pipedream": cal["F"] + cal["B"],
        "plain": steady(n_ranks=3),
        "replicated": steady(n_ranks=4, replicas=[2, 1, 1]),
        "replicated+1": steady(n_ranks=4, replicas=[2, 1, 1], admitted=3),
    }
    section = Section("async", "7. Asynchronous pipelines (sleeping stages): PipeDream and 1F1B-RR")
    section.short = "7. async"
    section.text.append(
        "Time per micro-batch. PipeDream never flushes: its steady state should take F + B of the slowest "
        "stage per micro-batch, where 1F1B also pays its flush, (m + p - 1) / m of that. *Theory* uses the "
        f"measured sleep durations (10 ms sleeps take {ms(sleeps[0.010])} ms, 20 ms {ms(sleeps[0.020])} ms). "
        "torch.distributed.pipelining has no asynchronous schedule, so this section compares with theory only.")
    table = Table(["layout", "theory ms / micro-batch", "steady state median", "min", "max", "steady / theory",
                   "whole run ms / micro-batch"])
    for label, key in (("1F1B, 4 stages (per step / 8)", "1f1b"), ("PipeDream, 4 stages", "pipedream"),
                       ("PipeDream, slow stage 0, [1, 1, 1] on 3 ranks", "plain"),
                       ("1F1B-RR, slow stage 0, [2, 1, 1] on 4 ranks (NOAM: 2 in flight per input replica)",
                        "replicated"),
                       ("1F1B-RR, slow stage 0, [2, 1, 1], admitted=3", "replicated+1")):
        steady_key = key if key == "1f1b" else f"{key} steady"
        steady = summarise(data[steady_key])
        whole = summarise(data[key])
        table.rows.append([label, ms(theory[key]), ms(steady.median), ms(steady.min), ms(steady.max),
                           ratio(steady.median / theory[key]), ms(whole.median)])
    section.tables.append(table)
    speedup = statistics.median(data["1f1b"]) / statistics.median(data["pipedream steady"])
    replicated = statistics.median(data["plain steady"]) / statistics.median(data["replicated steady"])
    admitted = statistics.median(data["plain steady"]) / statistics.median(data["replicated+1 steady"])
    section.notes.append(
        f"PipeDream's steady state is {speedup:.2f}x faster per micro-batch than 1F1B with its flush "
        f"(theory {theory['1f1b'] / theory['pipedream']:.2f}x); replicating the slow stage makes the stream "
        f"{replicated:.2f}x faster with NOAM admission (simulated {theory['plain'] / theory['replicated']:.2f}x: "
        f"the replicas wait for each other at every update) and {admitted:.2f}x with one more micro-batch "
        f"admitted per input replica (simulated {theory['plain'] / theory['replicated+1']:.2f}x). *Theory* for "
        "these layouts is the simulator's steady state, which models the replicas' shared updates.")
    section.headline.append(["PipeDream steady state vs 1F1B per micro-batch", f"{speedup:.2f}x", "n/a",
                             f"theory {theory['1f1b'] / theory['pipedream']:.2f}x"])
    section.headline.append(["1F1B-RR [2,1,1] vs plain, slow stage 0 (NOAM / admitted=3)",
                             f"{replicated:.2f}x / {admitted:.2f}x", "n/a",
                             f"simulated {theory['plain'] / theory['replicated']:.2f}x / "
                             f"{theory['plain'] / theory['replicated+1']:.2f}x"])
    section.seconds = time.perf_counter() - started
    return section
