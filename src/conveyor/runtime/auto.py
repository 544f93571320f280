"""``PipelineRunner(schedule="auto")``: profile the stages on the first step's first micro-batch,
search a program (``conveyor.schedule.search``) and run it from then on.

Profiling runs ZB-H1's one-micro-batch program (every rank: F, I, W) four times on micro-batch 0
and takes the median of the last three runs' action times (the first pays first-call costs);
the p2p latency comes from rank 0's round trip (from sending its activation to receiving the
gradient back) less the downstream compute, all on rank 0's clock.
Rank 0 gathers the costs, searches, and broadcasts the program's text. Profiling leaves nothing
behind: gradients, buffers and random state are restored, so the step's results are those of
the found program alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..schedule import Schedule, make_schedule, search
from ..schedule.links import incoming
from .executor import Executor
from .feed import StepData
from .steps import steps_of

__all__ = ["AUTO", "choose_schedule", "untouched"]

AUTO = "auto"
PROFILE_RUNS = 4  # the first run pays first-call costs; the median of the others is taken
SEARCH_BUDGET_S = 1.0


@contextmanager
def untouched(modules: Iterable[nn.Module], device: torch.device) -> Any:
    """Run the body, then put back every parameter's gradient, every buffer and the random state."""
    modules = list(modules)
    grads = [(p, p.grad) for module in modules for p in module.parameters()]
    buffers = [(b, b.detach().clone()) for module in modules for b in module.buffers()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    for parameter, _ in grads:
        parameter.grad = None
    try:
        yield
    finally:
        for parameter, grad in grads:
            parameter.grad = grad
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)


def _profile(rank: int, n_ranks: int, executor: Executor, transport: Any, data: StepData) -> tuple[dict, float]:
    """This rank's stage costs ``{"F", "I", "W"}`` (seconds) and its activation round trip."""
    program = make_schedule("zb-h1", n_ranks, n_ranks, 1)
    first = StepData(microbatches=data.microbatches[:1], targets=data.targets[:1], weights=data.weights[:1])
    links, steps = incoming(program, rank), steps_of(program, rank)
    samples: list[tuple[dict[str, float], float]] = []
    for _ in range(PROFILE_RUNS):
        executor.trace = []
        transport.expect(links)
        for step in steps:
            executor.run(step, first)
        transport.finish()
        timed = {text[-2]: (ready, end) for text, ready, end, _ in executor.trace}  # "3F0" -> "F"
        samples.append(({kind: end - ready for kind, (ready, end) in timed.items()}, timed["I"][0] - timed["F"][1]))
    executor.trace = []
    kept = samples[1:]
    costs = {kind: statistics.median(sample[0][kind] for sample in kept) for kind in kept[0][0]}
    round_trip = statistics.median(sample[1] for sample in kept)
    return costs, round_trip


def choose_schedule(runner: Any, data: StepData, memory_limit: int | None) -> Schedule:
    """Profile, search on rank 0 (of the runner's group), broadcast; every rank returns the program."""
    rank, n_ranks, group = runner.rank, runner.n_ranks, runner.group
    with untouched(runner.modules, runner.device):
        costs, round_trip = _profile(rank, n_ranks, runner._executor, runner.transport, data)
    gathered: list[Any] = [None] * n_ranks
    dist.all_gather_object(gathered, (costs, round_trip), group=group)
    text = [None]
    if rank == 0:
        table = {kind: [entry[0][kind] for entry in gathered] for kind in ("F", "I", "W")}
        downstream = sum(table["F"][1:]) + sum(table["I"][1:])
        comm = max(0.0, (gathered[0][1] - downstream) / (2 * (n_ranks - 1))) if n_ranks > 1 else 0.0
        found = search(table, memory_limit, n_microbatches=runner.n_microbatches, comm=comm,
                       budget_s=SEARCH_BUDGET_S)
        text = [found.to_text()]
        runner.auto_profile = {"costs": table, "comm": comm}
    source = dist.get_global_rank(group, 0) if group is not None else 0
    dist.broadcast_object_list(text, src=source, group=group)
    if rank != 0:
        runner.auto_profile = None
    return make_schedule(Schedule.from_text(text[0], name=AUTO), n_ranks, n_ranks, runner.n_microbatches)
