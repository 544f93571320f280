"""Schedules as data: per-rank action programs, with no tensors and no torch.distributed.

``SCHEDULES`` maps each public schedule name to its generator,
``generator(n_ranks, n_stages, n_microbatches, **options) -> Schedule``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from .actions import Action, Schedule
from .auto import search
from .controllable_memory import v_half, v_min
from .dualpipev import dualpipev
from .gpipe import gpipe
from .interleaved import interleaved_1f1b
from .one_f_one_b import one_f_one_b
from .pairs import pair_overlapping
from .pipedream import pipedream
from .pipedream_2bw import pipedream_2bw
from .simulate import SimulationResult, simulate
from .validate import ScheduleError, validate
from .zero_bubble import zb_h1, zb_h2, zb_v

__all__ = [
    "SCHEDULES",
    "Action",
    "Schedule",
    "ScheduleError",
    "SimulationResult",
    "make_schedule",
    "pair_overlapping",
    "search",
    "supports_replicas",
    "simulate",
    "validate",
]

Generator = Callable[..., Schedule]

SCHEDULES: dict[str, Generator] = {
    "gpipe": gpipe,
    "1f1b": one_f_one_b,
    "interleaved-1f1b": interleaved_1f1b,
    "zb-h1": zb_h1,
    "zb-h2": zb_h2,
    "zb-v": zb_v,
    "dualpipev": dualpipev,
    "v-min": v_min,
    "v-half": v_half,
    "v-zb": zb_v,  # Qi et al.'s V-ZB has ZB-V's figures (docs/schedules.md): the same program serves
    "pipedream": pipedream,
    "pipedream-2bw": pipedream_2bw,
}


def supports_replicas(name: str) -> bool:
    """Whether the named schedule's generator takes ``replicas=[...]`` (replicated stages)."""
    generator = SCHEDULES.get(name)
    return generator is not None and "replicas" in inspect.signature(generator).parameters


def make_schedule(
    schedule: str | Schedule, n_ranks: int, n_stages: int, n_microbatches: int, **options: Any
) -> Schedule:
    """Build (or check) the program for ``schedule`` and validate it."""
    if isinstance(schedule, Schedule):
        if options:
            raise TypeError(f"options {sorted(options)} apply to named schedules, not to a Schedule object")
        program = schedule
        if (program.n_stages, program.n_microbatches, program.n_ranks) != (n_stages, n_microbatches, n_ranks):
            raise ValueError(
                f"the given Schedule covers {program.n_stages} stages x {program.n_microbatches} micro-batches "
                f"on {program.n_ranks} ranks, but the runner has {n_stages} stages x {n_microbatches} "
                f"micro-batches on {n_ranks} ranks"
            )
    else:
        try:
            generator = SCHEDULES[schedule]
        except KeyError:
            raise ValueError(
                f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)} or pass a conveyor.Schedule"
            ) from None
        if options.get("replicas") is not None and not supports_replicas(schedule):
            supported = sorted(name for name in SCHEDULES if supports_replicas(name))
            raise ValueError(f"schedule {schedule!r} does not support replicated stages; use one of {supported}")
        if options.get("replicas", 0) is None:
            options = {k: v for k, v in options.items() if k != "replicas"}
        program = generator(n_ranks, n_stages, n_microbatches, **options)
    return validate(program)
