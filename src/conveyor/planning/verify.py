"""Run a plan's top candidates for a few steps and put measured step times beside predicted ones.

A measured step is what the planner predicts: ``runner.step`` (forward and backward of the whole
batch) from a barrier that starts every rank together until the last rank finishes, on
``perf_counter``'s system-wide clock; the optimizer step is not included. The first step warms up
and is not counted; the median of the rest is reported. An asynchronous candidate streams
``steps + 2`` batches; its step is the time between the last losses of consecutive batches on
the last stage's rank, after the first batch (the fill), updates included.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch.distributed as dist

from ..workloads import WorkloadSpec, load_workload
from .search import Candidate, Plan

__all__ = ["VERIFIED_HEADER", "Verified", "format_row", "format_verified", "verify"]


@dataclass
class Verified:
    candidate: Candidate
    measured_step_s: float | None  # None: not runnable in this version
    note: str = ""

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.measured_step_s is None:
            return None
        return (self.candidate.step_s - self.measured_step_s) / self.measured_step_s


def _worker(rank: int, world_size: int, spec: WorkloadSpec, schedule: str, sizes: tuple[int, ...],
            n_microbatches: int, batch_size: int, steps: int,
            replicas: tuple[int, ...] | None = None) -> list[tuple[float, float]]:
    import conveyor

    workload = load_workload(spec)
    model = workload.build_model()
    example, _ = workload.inputs(0, max(2, batch_size // n_microbatches))
    pipe = conveyor.pipeline(model, n_stages=len(sizes), balance=list(sizes), example_args=example)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=n_microbatches, loss_fn=workload.loss_fn,
                                     replicas=list(replicas) if replicas else None)
    optimizer = workload.make_optimizer(runner.parameters())
    if runner.schedule.is_streaming:
        batches = [(tuple(inputs), target) for inputs, target in
                   (workload.inputs(step, batch_size) for step in range(steps + 2))]
        stamps = [time.perf_counter() for _ in runner.stream(batches, optimizer)]
        ends = stamps[n_microbatches - 1::n_microbatches]
        return [(a, b) for a, b in zip(ends[1:], ends[2:])]  # on the last stage's rank only
    spans = []
    for step in range(steps + 1):
        inputs, target = workload.inputs(step, batch_size)
        optimizer.zero_grad()
        dist.barrier()
        start = time.perf_counter()
        runner.step(*inputs, target=target)
        spans.append((start, time.perf_counter()))
        optimizer.step()
    return spans[1:]


def verify(plan: Plan, spec: WorkloadSpec, *, top: int = 3, steps: int = 3, timeout: float = 600.0,
           threads_per_rank: int | None = None,
           on_result: Callable[[int, Verified], None] | None = None) -> list[Verified]:
    """Run each of the plan's ``top`` runnable candidates for ``steps`` measured steps on
    ``plan.n_ranks`` local processes. ``on_result(index, result)`` is called as each one finishes."""
    from ..launch import launch

    results = []
    for index, candidate in enumerate(plan.candidates[:top], 1):
        if not candidate.runnable:
            result = Verified(candidate, None, "not runnable (replicas this schedule cannot take)")
        else:
            per_rank = launch(_worker, plan.n_ranks, timeout=timeout, threads_per_rank=threads_per_rank,
                              args=(spec, candidate.schedule, candidate.sizes, candidate.n_microbatches,
                                    plan.batch_size, steps, candidate.replicas))
            if candidate.is_async:
                spans = [b - a for r in per_rank for a, b in r]
            else:
                spans = [max(r[i][1] for r in per_rank) - min(r[i][0] for r in per_rank) for i in range(steps)]
            result = Verified(candidate, statistics.median(spans))
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results


VERIFIED_HEADER = f"{'#':>2}  {'candidate':<44}{'predicted ms':>13}{'measured ms':>13}{'error':>8}"


def format_row(index: int, result: Verified) -> str:
    c = result.candidate
    measured = f"{result.measured_step_s * 1e3:>13.1f}" if result.measured_step_s is not None else f"{'-':>13}"
    error = f"{result.error:>+8.1%}" if result.error is not None else f"  {result.note}"
    return f"{index:>2}  {c.label():<44}{c.step_s * 1e3:>13.1f}{measured}{error}"


def format_verified(results: Sequence[Verified]) -> str:
    return "\n".join([VERIFIED_HEADER] + [format_row(i, r) for i, r in enumerate(results, 1)])


