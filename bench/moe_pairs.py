"""Benchmark: F&B pairs on a toy mixture-of-experts pipeline whose stages run their own all-to-all.

Two 2-stage pipelines (ranks 0-1 and 2-3) of :class:`conveyor.testing_moe.MoEStage`: each stage
computes (sleeps holding its process's "device" lock) ``C`` before and ``C`` after a dispatch and
a combine all-to-all over its expert group ({0, 2} for stage 0, {1, 3} for stage 1), each all-to-
all a real gloo ``all_to_all_single`` plus ``L`` of link latency; the backward computes twice as
long and runs the two all-to-alls again. The same program runs unpaired and with
``pair_overlapping`` (its adjacent F and B joined into F&B pairs, whose backward chunk runs on a
second thread while the forward runs), alternated; gradients are checked equal first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .harness import Plan, alternate, paired_ratios, pooled
from .report import Section, Table, ms, ratio

__all__ = ["CASES", "worker", "run"]

COMPUTE_S = 0.010  # C: each of the two compute blocks of a forward (the backward's are 2C)
LATENCY_S = 0.008  # L: added to every all-to-all
WIDTH = 64
CASES = [("1f1b", 2, 8), ("interleaved-1f1b", 4, 8)]  # (schedule, stages on the 2 ranks, micro-batches)


def _runners(rank: int, schedule: str, n_stages: int, n_microbatches: int, pipelines: list,
             experts: list) -> dict[str, Any]:
    import conveyor
    from conveyor.schedule import make_schedule, pair_overlapping
    from conveyor.testing_moe import MoEStage

    program = make_schedule(schedule, 2, n_stages, n_microbatches)
    costs = _costs(n_stages)
    programs = {"unpaired": program, "paired": pair_overlapping(program, costs=costs, overlap=HIDDEN)}
    runners = {}
    for label, chosen in programs.items():
        stages = [MoEStage(WIDTH, experts[s % 2], compute_s=COMPUTE_S, latency_s=LATENCY_S, seed=10 * s + rank // 2)
                  for s in range(n_stages)]
        runners[label] = conveyor.PipelineRunner(conveyor.pipeline(stages), schedule=chosen,
                                                 n_microbatches=n_microbatches, loss_fn=torch.nn.functional.mse_loss,
                                                 group=pipelines[rank // 2])
    return runners


FORWARD_S = 2 * COMPUTE_S + 2 * LATENCY_S
HIDDEN = min(1.0, 4 * LATENCY_S / FORWARD_S)  # a pair can hide its forward's and its backward's all-to-alls


def _costs(n_stages: int) -> dict[str, Any]:
    """F and B per stage; stage 0's input needs no gradient, so its first compute block has no backward."""
    return {"F": FORWARD_S, "B": [2 * COMPUTE_S + 2 * LATENCY_S] + [4 * COMPUTE_S + 2 * LATENCY_S] * (n_stages - 1)}


def _step(runner: Any, x: torch.Tensor, y: torch.Tensor) -> Any:
    def step() -> None:
        runner.step(x, target=y)
    return step


def worker(rank: int, world: int, plan: Plan, cases: list[tuple[str, int, int]]) -> dict[str, Any] | None:
    from conveyor.testing_moe import ExpertGroups

    torch.set_num_threads(1)
    pipelines = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    experts = [ExpertGroups.new([0, 2]), ExpertGroups.new([1, 3])]
    results: dict[str, Any] = {}
    for schedule, n_stages, n_microbatches in cases:
        runners = _runners(rank, schedule, n_stages, n_microbatches, pipelines, experts)
        x = torch.randn(4 * n_microbatches, WIDTH, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
        y = torch.zeros_like(x)
        grads = {}
        for label, runner in runners.items():
            for parameter in runner.parameters():
                parameter.grad = None
            runner.step(x, target=y)
            grads[label] = [p.grad.clone() for p in runner.parameters()]
        if not all(torch.equal(a, b) for a, b in zip(grads["paired"], grads["unpaired"])):
            raise AssertionError(f"{schedule}: the paired program's gradients differ from the unpaired one's")
        pairs = sum(a.overlaps_next for a in runners["paired"].schedule.ranks[rank % 2])

        measured = alternate({label: _step(runner, x, y) for label, runner in runners.items()}, plan)
        counted: list[int | None] = [None] * world
        dist.all_gather_object(counted, pairs)
        results[schedule] = {"times": measured.times, "foreign": measured.foreign, "redone": measured.redone,
                             "pairs": counted, "program": runners["paired"].schedule.to_text()}
        for runner in runners.values():
            runner.close()
    return results if rank == 0 else None


def run(plan: Plan, figures: Path) -> Section:
    """Run the benchmark and build its report section."""
    import conveyor
    from conveyor.schedule import make_schedule, pair_overlapping, simulate

    started = time.perf_counter()
    cases = CASES if plan.min_steps > 1 else CASES[:1]  # --quick: one case
    results = conveyor.launch(worker, 4, args=(plan, cases), threads_per_rank=1, timeout=1200)[0]
    section = Section("pairs", "9. F&B pairs on a toy MoE pipeline (2 pipelines x 2 ranks, an all-to-all per stage)",
                      short="F&B pairs")
    section.text.append(
        "Two pipelines of 2 ranks (2 stages, or 4 interleaved) of toy MoE stages "
        "(`conveyor.testing_moe.MoEStage`) on 4 processes. Each stage's forward computes C = "
        f"{ms(COMPUTE_S)} ms, dispatches half its rows to its expert-group peer (the same stage in the other "
        "pipeline) by a gloo all-to-all, computes C in its expert and combines by a second all-to-all; every "
        f"all-to-all waits L = {ms(LATENCY_S)} ms more (a slower link than loopback). The backward computes "
        "2C twice and runs both all-to-alls again. Compute is a sleep holding the process's one device lock, "
        "so a pair's two chunks never compute at once: only communication can hide. *paired*: the same "
        "program through `conveyor.schedule.pair_overlapping` (adjacent F and B run as F&B pairs, the "
        "backward chunk on a second thread; forwards and backwards use separate expert process groups); "
        "gradients checked bitwise equal (float64) before timing. *Simulated*: `simulate` with F = 2C + 2L, "
        "B = 4C + 2L (stage 0: 2C + 2L, its input needs no gradient), unpaired, and paired with each pair "
        "hiding its forward's and its backward's all-to-alls (`overlap` = 4L / F); `pair_overlapping` is "
        "given the same costs and overlap, so it keeps the pairs that pay off when they hide that much.")
    table = Table(["schedule", "stages", "m", "pairs per rank", "unpaired median ms", "paired median ms",
                   "paired / unpaired (paired rounds)", "simulated unpaired ms", "simulated paired, hidden ms"])
    for schedule, n_stages, n_microbatches in cases:
        data = results[schedule]
        unpaired, paired = pooled(data["times"]["unpaired"]), pooled(data["times"]["paired"])
        speed = paired_ratios(data["times"]["paired"], data["times"]["unpaired"])
        costs = _costs(n_stages)
        program = make_schedule(schedule, 2, n_stages, n_microbatches)
        paired_program = pair_overlapping(program, costs=costs, overlap=HIDDEN)
        table.rows.append([schedule, str(n_stages), str(n_microbatches), "/".join(str(p) for p in data["pairs"][:2]),
                           ms(unpaired.median), ms(paired.median),
                           f"{ratio(speed.median)} ({ratio(speed.min)}-{ratio(speed.max)})",
                           ms(simulate(program, costs=costs).makespan),
                           ms(simulate(paired_program, costs=costs, overlap=HIDDEN).makespan)])
        section.notes.append(f"{schedule} paired program (rank 0 / rank 1):\n\n```\n{data['program']}```")
    section.foreign = [share for data in results.values() for share in data["foreign"]]
    section.redone = sum(data["redone"] for data in results.values())
    section.tables.append(table)
    section.seconds = time.perf_counter() - started
    return section
