"""The same stages under ``torch.distributed.pipelining``: PipelineStage + a torch schedule.

Schedule names follow conveyor's; each maps to torch's nearest schedule class:

==================  =================================================================
conveyor            torch
==================  =================================================================
gpipe               ScheduleGPipe
1f1b                Schedule1F1B
interleaved-1f1b    ScheduleInterleaved1F1B (stages looped over ranks, as in conveyor)
zb-h1               ScheduleInterleavedZeroBubble with one stage per rank (ZB1P)
==================  =================================================================

Stage ``s`` lives on rank ``s % world_size`` in both libraries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["TORCH_SCHEDULES", "torch_step"]

TORCH_SCHEDULES: dict[str, str] = {
    "gpipe": "ScheduleGPipe",
    "1f1b": "Schedule1F1B",
    "interleaved-1f1b": "ScheduleInterleaved1F1B",
    "zb-h1": "ScheduleInterleavedZeroBubble",
}

_SINGLE = {"gpipe", "1f1b"}

def torch_step(modules: list[nn.Module], schedule: str, n_microbatches: int, loss_fn: Any,
               inputs: torch.Tensor, target: torch.Tensor,
               group: dist.ProcessGroup | None = None) -> tuple[Callable[[], None], Any]:
    """A step function running ``modules`` (all stages, in order) under torch's ``schedule``,
    and torch's schedule object.

    This rank builds the stages ``rank, rank + p, ...``; the step feeds ``inputs`` where stage 0
    lives and ``target`` where the last stage lives.
    """
    from torch.distributed import pipelining

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n_stages = len(modules)
    if schedule in _SINGLE and n_stages != world:
        raise ValueError(f"{schedule} needs one stage per rank, got {n_stages} stages on {world} ranks")
    device = torch.device("cpu")
    stages = [pipelining.PipelineStage(modules[s], s, n_stages, device, group=group)
              for s in range(rank, n_stages, world)]
    cls = getattr(pipelining, TORCH_SCHEDULES[schedule])
    runner = cls(stages[0] if schedule in _SINGLE else stages, n_microbatches, loss_fn=loss_fn)
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    args = (inputs,) if first else ()
    kwargs: dict[str, Any] = {"target": target, "losses": []} if last else {}

    def step() -> None:
        if last:
            kwargs["losses"] = []
        runner.step(*args, return_outputs=False, **kwargs)

    return step, runner


