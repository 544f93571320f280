"""What a pipeline really did: gather every rank's trace, measure its bubble, draw it.

``runner.trace`` holds this rank's actions of the last step; :func:`gather` collects all ranks'
(a collective: every rank calls it); :func:`render` and :func:`chrome_trace` draw them like the
simulator's events (``conveyor.schedule.render``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch.distributed as dist

from .runtime.runner import PipelineRunner, TraceEvent
from .schedule.render import chrome_trace, render_timeline

__all__ = ["gather", "measured_bubble", "render", "chrome_trace", "sleep_pipeline_trace", "sleep_costs"]


def gather(runner: PipelineRunner) -> list[TraceEvent]:
    """Every rank's trace of the last step, on every rank of the runner's group."""
    everyone: list[Any] = [None] * runner.n_ranks
    dist.all_gather_object(everyone, list(runner.trace), group=runner.group)
    return [event for events in everyone for event in events]


def measured_bubble(events: Sequence[TraceEvent], n_ranks: int | None = None) -> float:
    """``1 - busy / (ranks * span)``: the share of the step the ranks spent not computing."""
    n_ranks = n_ranks or len({event.rank for event in events})
    start = min(event.start - event.waited for event in events)
    span = max(event.end for event in events) - start
    busy = sum(event.end - event.start for event in events)
    return 1.0 - busy / (n_ranks * span)


def render(events: Sequence[TraceEvent], path: str | Path, *, title: str | None = None) -> Path:
    """Draw a run's events (PNG, SVG or PDF, by the file name)."""
    return render_timeline(events, path, title=title)


def _sleep_worker(rank: int, world_size: int, schedule: str, n_stages: int, n_microbatches: int,
                  costs: tuple[float, float, float], steps: int) -> list[TraceEvent]:
    import torch

    from . import pipeline
    from .testing import SleepStage, sleep_loss

    forward_s, input_grad_s, weight_grad_s = costs
    stages = [SleepStage(forward_s, input_grad_s, weight_grad_s) for _ in range(n_stages)]
    runner = PipelineRunner(pipeline(stages), schedule=schedule, n_microbatches=n_microbatches, loss_fn=sleep_loss)
    x = torch.zeros(n_microbatches, 4)
    for _ in range(steps):
        dist.barrier()  # every rank starts the step together, so the span is the step's
        if runner.schedule.is_streaming:  # one batch as a stream: fill, steady state, drain
            for _ in runner.stream([(x, x)], torch.optim.SGD(runner.parameters(), lr=0.0)):
                pass
        else:
            runner.step(x, target=x)
    return gather(runner)


def sleep_pipeline_trace(schedule: str, n_ranks: int, n_stages: int, n_microbatches: int,
                         costs: tuple[float, float, float] = (0.01, 0.01, 0.01), steps: int = 3) -> list[TraceEvent]:
    """Run sleep stages (forward, input-grad, weight-grad seconds) on local processes; return the
    last step's events of all ranks."""
    from .launch import launch

    return launch(_sleep_worker, n_ranks, args=(schedule, n_stages, n_microbatches, costs, steps))[0]


def sleep_costs(n_stages: int, stage_seconds: tuple[float, float, float]) -> dict[str, list[float]]:
    """Per-stage simulator costs matching :class:`~conveyor.testing.SleepStage` pipelines: stage 0
    has no input gradient, so its backward is the weight part alone."""
    forward_s, input_grad_s, weight_grad_s = stage_seconds
    input_grad = [0.0] + [input_grad_s] * (n_stages - 1)
    return {"F": [forward_s] * n_stages, "I": input_grad, "W": [weight_grad_s] * n_stages,
            "B": [i + weight_grad_s for i in input_grad]}
