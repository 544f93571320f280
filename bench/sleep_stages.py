"""Stages that take a known time without using a core: ``time.sleep`` in forward and backward.

Four processes on two cores can then run a pipeline whose ideal step time is exactly the
simulator's makespan, so measured / ideal is the runtime's schedule efficiency.

:class:`SleepStage` is one autograd node (F sleeps ``forward_s``, the whole backward sleeps
``backward_s``). :class:`SplitSleepStage` has two nodes for a split backward::

    x --> InputPath (F sleeps, backward sleeps input_s) --+
                                                           +--> add --> output
    w --> WeightPath (backward sleeps weight_s) ----------+

so a gradient w.r.t. ``x`` (I) runs only InputPath and a gradient w.r.t. ``w`` (W) only
WeightPath; the add is where torch's zero-bubble code finds the weight branch.

Every sleep appends ``(stage, kind, start, end)`` to the stage's ``records`` list (if given):
the same instrumentation under both libraries, so their traces compare directly.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

__all__ = ["Record", "SleepStage", "SplitSleepStage", "measure_sleep"]

Record = tuple[int, str, float, float]


def _sleep(seconds: float, where: tuple[int, str, list[Record] | None]) -> None:
    start = time.perf_counter()
    time.sleep(seconds)
    stage, kind, records = where
    if records is not None:
        records.append((stage, kind, start, time.perf_counter()))


class _Sleep(torch.autograd.Function):
    """``y = x * w``; forward sleeps ``forward_s``, backward ``backward_s`` (for both grads)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, forward_s: float, backward_s: float,
                where: tuple) -> torch.Tensor:
        ctx.backward_s, ctx.where = backward_s, where
        _sleep(forward_s, (where[0], "F", where[1]))
        return x * w.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _sleep(ctx.backward_s, (ctx.where[0], "B", ctx.where[1]))
        return grad, grad.sum().reshape(1), None, None, None


class _InputPath(torch.autograd.Function):
    """Identity on ``x``; forward sleeps ``forward_s``, backward ``backward_s`` (the I node)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float, where: tuple) -> torch.Tensor:
        ctx.backward_s, ctx.where = backward_s, where
        _sleep(forward_s, (where[0], "F", where[1]))
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _sleep(ctx.backward_s, (ctx.where[0], "I", ctx.where[1]))
        return grad, None, None, None


class _WeightPath(torch.autograd.Function):
    """Zeros of ``shape`` that depend on ``w`` only; backward sleeps ``backward_s`` (the W node)."""

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, shape: tuple[int, ...], backward_s: float, where: tuple) -> torch.Tensor:
        ctx.backward_s, ctx.where = backward_s, where
        return torch.zeros(shape, dtype=w.dtype) * w.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        _sleep(ctx.backward_s, (ctx.where[0], "W", ctx.where[1]))
        return grad.sum().reshape(1), None, None, None


class SleepStage(nn.Module):
    """Stage ``index``: forward sleeps ``forward_s``, backward ``backward_s``."""

    def __init__(self, index: int, forward_s: float, backward_s: float, records: list[Record] | None = None) -> None:
        super().__init__()
        self.index, self.forward_s, self.backward_s, self.records = index, forward_s, backward_s, records
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.w, self.forward_s, self.backward_s, (self.index, self.records))


class SplitSleepStage(nn.Module):
    """Stage ``index`` with separate input-grad (``input_s``) and weight-grad (``weight_s``) nodes."""

    def __init__(self, index: int, forward_s: float, input_s: float, weight_s: float,
                 records: list[Record] | None = None) -> None:
        super().__init__()
        self.index, self.forward_s, self.input_s, self.weight_s = index, forward_s, input_s, weight_s
        self.records = records
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        where = (self.index, self.records)
        return (_InputPath.apply(x, self.forward_s, self.input_s, where)
                + _WeightPath.apply(self.w, tuple(x.shape), self.weight_s, where))


def measure_sleep(seconds: float, repeats: int = 20) -> float:
    """The median time ``time.sleep(seconds)`` really takes here (its overshoot is not the runtime's)."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        time.sleep(seconds)
        samples.append(time.perf_counter() - start)
    samples.sort()
    return samples[len(samples) // 2]
