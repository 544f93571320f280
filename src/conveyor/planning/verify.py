"""Run a plan's top candidates for a few steps and put measured step times beside predicted ones.

A measured step is what the planner predicts: ``runner.step`` (forward and backward of the whole
batch) and the optimizer step after it, from a barrier that starts every rank together until the
last rank finishes its optimizer step, on ``perf_counter``'s system-wide clock. The first step warms up
and is not counted; the median of the rest is reported. An asynchronous candidate streams
``steps + 2`` batches; its step is the mean time between the last losses of consecutive batches
on the last stage's rank, from the first batch's (after the fill) to the last, updates included
(a mean, so that 2BW's windows, which update every ``n_stages`` micro-batches, count whole).
*Spread*: (slowest - fastest) / median over the measured steps (asynchronous: over the single
batch-to-batch gaps), how far repeats of one candidate ran apart, the floor under its error.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from ..workloads import Workload, WorkloadSpec, load_workload
from .search import Candidate, Plan

__all__ = ["VERIFIED_HEADER", "TimedStep", "Verified", "candidate_runner", "format_row", "format_verified",
           "stream_batches", "timed_steps",
           "verify"]


@dataclass
class Verified:
    candidate: Candidate
    measured_step_s: float | None  # None: not runnable in this version
    note: str = ""
    measured_without_optimizer_s: float | None = None  # synchronous: runner.step alone (what main measured)
    measured_range_s: tuple[float, float] | None = None  # the fastest and slowest measured step

    @property
    def spread(self) -> float | None:
        """(slowest - fastest) / median of the measured steps: how far apart repeats of the same
        candidate ran, the noise floor under its error."""
        if self.measured_step_s is None or self.measured_range_s is None:
            return None
        return (self.measured_range_s[1] - self.measured_range_s[0]) / self.measured_step_s

    @property
    def error(self) -> float | None:
        """(predicted - measured) / measured."""
        if self.measured_step_s is None:
            return None
        return (self.candidate.step_s - self.measured_step_s) / self.measured_step_s

    def to_dict(self) -> dict:
        """The candidate, its predicted and measured step (seconds) and the error, for JSON."""
        c = self.candidate
        return {"label": c.label(), "schedule": c.schedule, "sizes": list(c.sizes),
                "replicas": list(c.replicas) if c.replicas else None, "n_microbatches": c.n_microbatches,
                "predicted_step_s": c.step_s, "measured_step_s": self.measured_step_s, "error": self.error,
                "confidence": c.confidence, "note": self.note,
                "measured_without_optimizer_s": self.measured_without_optimizer_s,
                "measured_range_s": list(self.measured_range_s) if self.measured_range_s else None,
                "spread": self.spread}


def candidate_runner(spec: WorkloadSpec, schedule: str, sizes: Sequence[int], n_microbatches: int,
                     batch_size: int, replicas: Sequence[int] | None = None) -> tuple[Workload, Any, Any]:
    """The workload, a PipelineRunner running it as the candidate says (this rank's part) and the
    workload's optimizer over the runner's parameters: what ``--verify`` and the benchmarks run."""
    import conveyor

    workload = load_workload(spec)
    example, _ = workload.inputs(0, max(2, batch_size // n_microbatches))
    pipe = conveyor.pipeline(workload.build_model(), n_stages=len(sizes), balance=list(sizes), example_args=example)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=n_microbatches, loss_fn=workload.loss_fn,
                                     replicas=list(replicas) if replicas else None)
    return workload, runner, workload.optimizer_for(runner.parameters())


def stream_batches(workload: Workload, batch_size: int, count: int) -> list[tuple[tuple, Any]]:
    """The first ``count`` batches of ``workload`` as ``runner.stream`` takes them."""
    return [(tuple(inputs), target) for inputs, target in (workload.inputs(step, batch_size) for step in range(count))]


@dataclass
class TimedStep:
    """One synchronous training step on this rank, on ``perf_counter``'s clock: ``start`` after the
    barrier, ``stepped`` when ``runner.step`` returned, ``end`` after the optimizer step;
    ``update_s`` the optimizer step on the clock asked for; ``trace`` the runner's actions."""

    start: float
    stepped: float
    end: float
    update_s: float
    trace: list


def timed_steps(workload: Workload, runner: Any, optimizer: Any, batch_size: int, steps: int,
                update_clock: Callable[[], float] = time.perf_counter) -> list[TimedStep]:
    """``steps + 1`` steps of the workload's batches, each from a barrier that starts every rank
    together, then the optimizer step; the first warms up and is dropped."""
    timed = []
    for step in range(steps + 1):
        inputs, target = workload.inputs(step, batch_size)
        optimizer.zero_grad()
        dist.barrier()
        start = time.perf_counter()
        runner.step(*inputs, target=target)
        stepped = time.perf_counter()
        update = update_clock()
        optimizer.step()
        update = update_clock() - update
        timed.append(TimedStep(start, stepped, time.perf_counter(), update, list(runner.trace)))
    return timed[1:]


def _worker(rank: int, world_size: int, spec: WorkloadSpec, schedule: str, sizes: tuple[int, ...],
            n_microbatches: int, batch_size: int, steps: int,
            replicas: tuple[int, ...] | None = None) -> list[tuple[float, ...]]:
    workload, runner, optimizer = candidate_runner(spec, schedule, sizes, n_microbatches, batch_size, replicas)
    if runner.schedule.is_streaming:
        batches = stream_batches(workload, batch_size, steps + 2)
        stamps = [time.perf_counter() for _ in runner.stream(batches, optimizer)]
        per_batch = n_microbatches // (replicas[-1] if replicas else 1)  # a replica yields its share of losses
        ends = stamps[per_batch - 1::per_batch]
        return list(zip(ends, ends[1:]))  # (previous batch's end, this batch's end), on the last stage's ranks only
    return [(t.start, t.end, t.stepped) for t in timed_steps(workload, runner, optimizer, batch_size, steps)]


def verify(plan: Plan, spec: WorkloadSpec, *, top: int = 3, steps: int = 3, timeout: float = 600.0,
           threads_per_rank: int | None = None,
           on_result: Callable[[int, Verified], None] | None = None) -> list[Verified]:
    """Run each of the plan's ``top`` runnable candidates for ``steps`` measured steps on
    ``plan.n_ranks`` local processes (a candidate the runner refuses is reported with its
    refusal, not run). ``on_result(index, result)`` is called as each one finishes."""
    from ..launch import launch

    results = []
    for index, candidate in enumerate(plan.candidates[:top], 1):
        if not candidate.runnable:
            result = Verified(candidate, None, f"not runnable: {candidate.refusal}")
        else:
            per_rank = launch(_worker, plan.n_ranks, timeout=timeout, threads_per_rank=threads_per_rank,
                              args=(spec, candidate.schedule, candidate.sizes, candidate.n_microbatches,
                                    plan.batch_size, steps, candidate.replicas))
            if candidate.is_async:
                periods = [(gaps[-1][1] - gaps[0][0]) / len(gaps) for gaps in per_rank if gaps]  # a mean per last rank
                single = [end - start for gaps in per_rank for start, end in gaps]
                result = Verified(candidate, statistics.median(periods),
                                  measured_range_s=(min(single), max(single)) if single else None)
            else:
                begin = [min(r[i][0] for r in per_rank) for i in range(steps)]
                spans = [max(r[i][1] for r in per_rank) - begin[i] for i in range(steps)]
                stepped = [max(r[i][2] for r in per_rank) - begin[i] for i in range(steps)]
                result = Verified(candidate, statistics.median(spans),
                                  measured_without_optimizer_s=statistics.median(stepped),
                                  measured_range_s=(min(spans), max(spans)))
        results.append(result)
        if on_result is not None:
            on_result(index, result)
    return results


VERIFIED_HEADER = f"{'#':>2}  {'candidate':<44}{'predicted ms':>13}{'measured ms':>13}{'spread':>8}{'error':>8}"


def format_row(index: int, result: Verified) -> str:
    c = result.candidate
    measured = f"{result.measured_step_s * 1e3:>13.1f}" if result.measured_step_s is not None else f"{'-':>13}"
    spread = f"{result.spread:>8.0%}" if result.spread is not None else f"{'-':>8}"
    error = f"{result.error:>+8.1%}" if result.error is not None else f"  {result.note}"
    return f"{index:>2}  {c.label():<44}{c.step_s * 1e3:>13.1f}{measured}{spread}{error}"


def format_verified(results: Sequence[Verified]) -> str:
    return "\n".join([VERIFIED_HEADER] + [format_row(i, r) for i, r in enumerate(results, 1)])


