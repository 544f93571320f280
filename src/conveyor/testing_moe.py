"""A toy mixture-of-experts stage whose forward and backward run their own collective (an
all-to-all over an expert group), for the F&B pair tests and benchmark.

Each process is one device: :func:`busy` holds a process-wide lock while it "computes" (sleeps),
so two chunks of an F&B pair never compute at the same time, while waiting for the all-to-all
does not hold it: exactly what overlapping can hide. The all-to-all is a real gloo
``all_to_all_single``; ``latency_s`` adds a wait between posting it and waiting for it, standing in
for a slower link than loopback.

An F&B pair runs the backward chunk on a second thread while the forward chunk runs, so a stage
with collectives issues its forward's on one process group and its backward's on another
(:class:`ExpertGroups`): each group then sees the same order of collectives on every rank.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["ExpertGroups", "MoEStage", "busy"]

_DEVICE = threading.Lock()  # this process's one "device": compute of two chunks never overlaps


def busy(seconds: float) -> None:
    """Compute for ``seconds`` on this process's device (a sleep holding the device lock)."""
    if seconds > 0:
        with _DEVICE:
            time.sleep(seconds)


@dataclass(frozen=True)
class ExpertGroups:
    """The expert group's ranks as two process groups: forward collectives use ``forward``,
    backward collectives ``backward`` (every rank creates both, in the same order)."""

    forward: dist.ProcessGroup
    backward: dist.ProcessGroup

    @classmethod
    def new(cls, ranks: list[int]) -> ExpertGroups:
        return cls(dist.new_group(ranks), dist.new_group(ranks))


class _Busy(torch.autograd.Function):
    """Identity that computes ``forward_s`` forward and ``backward_s`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        ctx.backward_s = backward_s
        busy(forward_s)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        busy(ctx.backward_s)
        return grad, None, None


def _all_to_all(x: torch.Tensor, group: dist.ProcessGroup, latency_s: float) -> torch.Tensor:
    out = torch.empty_like(x)
    work = dist.all_to_all_single(out, x.contiguous(), group=group, async_op=True)
    if latency_s > 0:
        time.sleep(latency_s)
    work.wait()
    return out


class _AllToAll(torch.autograd.Function):
    """Rows split evenly over the group's ranks; backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, groups: ExpertGroups, latency_s: float) -> torch.Tensor:
        ctx.groups, ctx.latency_s = groups, latency_s
        return _all_to_all(x, groups.forward, latency_s)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return _all_to_all(grad, ctx.groups.backward, ctx.latency_s), None, None


class MoEStage(nn.Module):
    """``x + combine(expert(dispatch(mix(x))))``: a dense layer (``compute_s`` forward, twice that
    backward), a dispatch all-to-all sending half the rows to each of the 2 ranks' expert, the
    local expert (same compute), and the combine all-to-all bringing the rows home. Rows must
    divide evenly over the group."""

    def __init__(self, width: int, groups: ExpertGroups, *, compute_s: float = 0.0, latency_s: float = 0.0,
                 seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.mix = nn.Linear(width, width, dtype=dtype)
        self.expert = nn.Linear(width, width, dtype=dtype)
        with torch.no_grad():
            for parameter in self.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype) * 0.3)
        self.groups, self.compute_s, self.latency_s = groups, compute_s, latency_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.mix(_Busy.apply(x, self.compute_s, 2 * self.compute_s)))
        routed = _AllToAll.apply(hidden, self.groups, self.latency_s)
        expert = torch.tanh(self.expert(_Busy.apply(routed, self.compute_s, 2 * self.compute_s)))
        return x + _AllToAll.apply(expert, self.groups, self.latency_s)
