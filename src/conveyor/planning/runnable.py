"""Whether the runtime accepts a candidate, asked of the runtime's own checks: the schedule is
built as ``PipelineRunner`` builds it (``make_schedule``: replicas the schedule cannot take,
micro-batch counts a layout refuses, ...) and tied weights are checked by the runner's
``check_ties``, so ``Candidate.runnable`` cannot drift from what the runner refuses."""

from __future__ import annotations

from functools import lru_cache

from ..runtime.auto import AUTO
from ..runtime.ties import check_ties
from ..schedule import SCHEDULES, ScheduleError, make_schedule

__all__ = ["runner_refusal"]


@lru_cache(maxsize=4096)
def runner_refusal(schedule: str, n_ranks: int, n_stages: int, n_microbatches: int,
                   replicas: tuple[int, ...] | None, tied_across_stages: bool) -> str | None:
    """The error ``PipelineRunner`` would raise for this layout (None: it runs). A tie across
    stages stands for any parameter two stages hold (GPT-2's ``wte`` and ``lm_head``)."""
    replicated = replicas is not None and any(r > 1 for r in replicas)
    if schedule == AUTO:  # PipelineRunner's own rule; it runs 1F1B until its first step has profiled the stages
        if replicated or n_stages != n_ranks:
            return "schedule='auto' places one stage per rank and takes no replicas"
        schedule = "1f1b"
    if schedule not in SCHEDULES:
        return f"no schedule named {schedule!r} in this version"
    try:
        program = make_schedule(schedule, n_ranks, n_stages, n_microbatches,
                                **({"replicas": list(replicas)} if replicated else {}))
        check_ties(program, {"tied": [0, n_stages - 1]} if tied_across_stages else {})
    except (ScheduleError, ValueError, TypeError) as error:
        return str(error)
    return None
