"""Stages with known costs, for benchmarks, timelines and planner tests.

:class:`SleepStage` sleeps instead of computing, so many of them share a few cores without
disturbing each other: the forward sleeps ``forward_s``; the backward is two autograd nodes,
one on the path to the input (sleeping ``input_grad_s``) and one on the path to the weight
(sleeping ``weight_grad_s``), so a zero-bubble split backward runs them as separate I and W
actions while a full backward runs both.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

__all__ = ["SleepStage", "sleep_loss"]


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
