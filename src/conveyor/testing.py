"""Stages with known costs, for benchmarks, timelines and planner tests.

:class:`SleepStage` sleeps instead of computing, so many of them share a few cores without
disturbing each other: the forward sleeps ``forward_s``; the backward is two autograd nodes,
one on the path to the input (sleeping ``input_grad_s``) and one on the path to the weight
(sleeping ``weight_grad_s``), so a zero-bubble split backward runs them as separate I and W
actions while a full backward runs both.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["count_collectives", "SleepStage", "sleep_loss"]


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.backward_s = backward_s
        if forward_s > 0:
            time.sleep(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.backward_s > 0:
            time.sleep(ctx.backward_s)
        return grad, None, None


class SleepStage(nn.Module):
    """``x -> x * weight`` that takes ``forward_s`` seconds forward and ``input_grad_s +
    weight_grad_s`` backward (split between the input and the weight path)."""

    def __init__(self, forward_s: float = 0.01, input_grad_s: float = 0.01, weight_grad_s: float = 0.01) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))
        self.forward_s, self.input_grad_s, self.weight_grad_s = forward_s, input_grad_s, weight_grad_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = _Sleep.apply(x, self.forward_s, self.input_grad_s)
        return hidden * _Sleep.apply(self.weight, 0.0, self.weight_grad_s)


def sleep_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A cheap scalar loss for sleep pipelines."""
    return (output - target).pow(2).mean()


@contextmanager
def count_collectives() -> Iterator[dict[str, int]]:
    """Count the reduce-scatters, all-gathers and all-reduces this process issues through
    ``torch.distributed`` (FSDP2 calls ``reduce_scatter_single``/``all_gather_single`` on torch 2.13,
    the ``_tensor`` names before)."""
    counts = {"reduce_scatter": 0, "all_gather": 0, "all_reduce": 0}
    names = {"reduce_scatter_single": "reduce_scatter", "reduce_scatter_tensor": "reduce_scatter",
             "all_gather_single": "all_gather", "all_gather_into_tensor": "all_gather", "all_reduce": "all_reduce"}
    originals = {name: getattr(dist, name) for name in names if hasattr(dist, name)}

    def counted(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts[names[name]] += 1
            return originals[name](*args, **kwargs)
        return call

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
