"""The stages under conveyor: ``conveyor.pipeline`` of the stage list + ``PipelineRunner``."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import conveyor

__all__ = ["conveyor_step"]


def conveyor_step(modules: list[nn.Module], schedule: str, n_microbatches: int, loss_fn: Any,
                  inputs: torch.Tensor, target: torch.Tensor,
                  group: dist.ProcessGroup | None = None) -> tuple[Callable[[], None], conveyor.PipelineRunner]:
    """A step function running ``modules`` (one stage each) under conveyor's ``schedule``, and
    its runner (whose ``trace`` holds the latest step's actions). ``CONVEYOR_BENCH_TRANSPORT``
    picks the transport (default ``auto``: sockets on one host), to compare them."""
    pipe = conveyor.pipeline(list(modules))
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=n_microbatches, loss_fn=loss_fn,
                                     group=group, device="cpu",  # the CPU benchmark, also on a GPU host
                                     transport=os.environ.get("CONVEYOR_BENCH_TRANSPORT", "auto"))

    def step() -> None:
        runner.step(inputs, target=target)

    return step, runner
