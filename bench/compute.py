"""Benchmarks 3 and 4, real compute on 2 cores: a model cut into 2 stages on 2 processes with 1
thread each, against the same model in one process with 1 thread accumulating the same 8
micro-batches.

The ideal speedup is measured in the same run: the machine's two-process ceiling (the whole
model in one process, against two processes started together each running its half of the
work, with no communication) times m / (m + 1), the 1F1B bubble of 2 stages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from . import charts
from .harness import Measured, Plan, alternate, paired_ratios, pooled, round_medians, summarise
from .ours import conveyor_step
from .report import Section, Table, ratio, summary_cells
from .torch_pipelining import torch_step
from .workloads import Workload, mlp_workload, transformer_workload

__all__ = ["MODELS", "worker", "run"]

N_RANKS = 2
N_MICROBATCHES = 8
SCHEDULE = "1f1b"

MODELS: dict[str, tuple[Callable[[int], Workload], str]] = {
    "mlp": (mlp_workload, "MLP: 8 x (Linear(512, 512) + ReLU), batch 64"),
    "transformer": (transformer_workload, "GPT-2-style decoder: 4 blocks, width 256, 4 heads, seq 128, "
                                          "vocab 512, batch 8"),
}


def _single(work: Workload, rank: int) -> Callable[[], None]:
    """The whole model on rank 0, micro-batch after micro-batch, gradients accumulated."""
    model = torch.nn.Sequential(*work.stages)
    inputs, targets = work.inputs.chunk(N_MICROBATCHES), work.target.chunk(N_MICROBATCHES)

    def step() -> None:
        if rank == 0:
            for x, y in zip(inputs, targets):
                (work.loss_fn(model(x), y) / N_MICROBATCHES).backward()

    return step


def _halves(work: Workload, rank: int) -> Callable[[], None]:
    """Each rank its own stage's forward and backward on all micro-batches, no communication."""
    stage = work.stages[rank]
    inputs, targets = work.inputs.chunk(N_MICROBATCHES), work.target.chunk(N_MICROBATCHES)
    with torch.no_grad():
        boundary = [work.stages[0](x) for x in inputs]  # what the second stage receives
    grads = [torch.randn_like(b) for b in boundary]

    def step() -> None:
        for i in range(N_MICROBATCHES):
            if rank == 0:
                stage(inputs[i]).backward(grads[i])
            else:
                x = boundary[i].detach().requires_grad_(True)
                (work.loss_fn(stage(x), targets[i]) / N_MICROBATCHES).backward()

    return step


def worker(rank: int, world: int, model: str, plan: Plan) -> Measured | None:
    """Single process, two halves, conveyor and torch, alternated: their step times (rank 0)."""
    torch.set_num_threads(1)
    torch_group = dist.new_group(list(range(world)))
    build = MODELS[model][0]
    works = [build(world) for _ in range(4)]
    ours, _ = conveyor_step(works[2].stages, SCHEDULE, N_MICROBATCHES, works[2].loss_fn, works[2].inputs,
                            works[2].target)
    reference, _ = torch_step(works[3].stages, SCHEDULE, N_MICROBATCHES, works[3].loss_fn, works[3].inputs,
                              works[3].target, group=torch_group)
    contenders = {"single": _single(works[0], rank), "halves": _halves(works[1], rank),
                  "conveyor": ours, "torch": reference}
    measured = alternate(contenders, plan)
    return measured if rank == 0 else None


def run(plan: Plan, figures: Path, model: str = "mlp", number: int = 3) -> Section:
    """Run the benchmark for ``model`` and build its report section (numbered ``number``)."""
    import conveyor

    started = time.perf_counter()
    measured = conveyor.launch(worker, N_RANKS, args=(model, plan), threads_per_rank=1, timeout=900)[0]
    times = measured.times
    m = N_MICROBATCHES
    section = Section(f"compute-{model}", f"{number}. Real compute on 2 cores: {model}, 2 stages, 1 thread per "
                                          "process")
    section.text.append(
        f"{MODELS[model][1]}; {m} micro-batches, schedule {SCHEDULE} in both libraries (torch: Schedule1F1B). "
        "*single*: the whole model in one process with 1 thread, accumulating the same micro-batches. "
        "*halves*: both processes at once, each running its stage's forward and backward on all micro-batches "
        "with no communication; single / halves is the machine's two-process ceiling. "
        f"Ideal speedup = ceiling x m / (m + 1) = ceiling x {m / (m + 1):.3f}.")
    steps = Table(["contender", "median ms", "min", "max", "steps"])
    for name in ("single", "halves", "conveyor", "torch"):
        summary = pooled(times[name])
        steps.rows.append([name, *summary_cells(summary), str(summary.n)])
    single = round_medians(times["single"])
    ceiling = [s / h for s, h in zip(single, round_medians(times["halves"]))]
    ideal = [c * m / (m + 1) for c in ceiling]
    ratios = Table(["figure (median over rounds of per-round ratios)", "median", "min", "max"])
    ratios.rows.append(["two-process ceiling (single / halves)", *summary_cells(summarise(ceiling), "ratio")])
    ratios.rows.append(["ideal speedup (ceiling x m/(m+1))", *summary_cells(summarise(ideal), "ratio")])
    chart: list[tuple[str, float, float]] = []
    found: dict[str, float] = {}
    for library in ("conveyor", "torch"):
        speedup = [s / t for s, t in zip(single, round_medians(times[library]))]
        of_ideal = summarise([s / i for s, i in zip(speedup, ideal)])
        ratios.rows.append([f"{library} speedup (single / {library})", *summary_cells(summarise(speedup), "ratio")])
        ratios.rows.append([f"{library} / ideal (target >= 0.85)" if library == "conveyor" else
                            f"{library} / ideal", *summary_cells(of_ideal, "ratio")])
        found[library] = of_ideal.median
        found[f"{library} speedup"] = summarise(speedup).median
    paired = paired_ratios(times["torch"], times["conveyor"])
    ratios.rows.append(["conveyor speedup / torch speedup (torch time / ours, paired)",
                        *summary_cells(paired, "ratio")])
    chart.append((model, found["conveyor"], found["torch"]))
    section.headline += [
        ["speedup over 1 process (median)", ratio(found["conveyor speedup"]), ratio(found["torch speedup"]),
         f"{ratio(paired.median)}x the speedup"],
        [f"speedup / ideal (ideal {ratio(summarise(ideal).median)}; target >= 0.85)", ratio(found["conveyor"]),
         ratio(found["torch"]), ""]]
    section.tables += [steps, ratios]
    section.short = f"{number}. {model} on 2 cores"
    section.foreign, section.redone = measured.foreign, measured.redone
    section.notes.append(
        f"Measured speedup / ideal: conveyor {ratio(found['conveyor'])}, torch {ratio(found['torch'])}. The ideal "
        "assumes free messages; a value above 1 means the ceiling came out pessimistic in that run (the halves "
        "block met more interference, or running both halves flat out slows this machine more than a pipeline "
        "with its bubbles does).")
    figure = charts.ratio_bars(chart, figures / f"compute_{model}.png", "speedup / ideal speedup",
                               targets=[0.85])
    if figure is not None:
        section.figures.append(figure)
    section.seconds = time.perf_counter() - started
    return section
