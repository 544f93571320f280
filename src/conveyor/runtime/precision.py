"""Mixed precision: autocast per stage, fp32 master weights, one loss-scaling decision per step.

``precision="bf16"`` runs every stage's forward (and the loss) under
``torch.autocast(device.type, dtype=torch.bfloat16)``; parameters stay fp32, so the optimizer
updates fp32 master weights. ``precision="fp16"`` does the same with float16 and scales the
loss: the last stage multiplies each micro-batch's loss by :attr:`LossScaler.scale` before its
backward, so every gradient in the pipeline is scaled. Before the optimizer step
:meth:`ScaledStep.optimizer_step` unscales this process's gradients, takes the MAX of the
found-inf flags over the whole pipeline (an all-reduce over the runner's group), and then every
stage steps or every stage skips, and every copy of the scale changes the same way.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["PRECISIONS", "LossScaler", "ScaledStep", "autocast_for", "check_precision", "overflow_in_group"]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision: str, streaming: bool = False) -> str:
    """``precision`` if it is known (and, for fp16, the schedule leaves the optimizer step to the caller)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not one of {PRECISIONS}: use 'bf16' (autocast, no scaling), "
                         "'fp16' (autocast with loss scaling) or 'fp32'")
    if precision == "fp16" and streaming:
        raise ValueError("precision='fp16' needs the optimizer step outside the pipeline (loss scaling decides "
                         "it), but this asynchronous schedule steps inside it: use precision='bf16'")
    return precision


def autocast_for(precision: str, device: torch.device) -> Callable[[], AbstractContextManager[Any]]:
    """A factory of the context a stage's forward runs in on ``device`` (no-op for fp32)."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = _DTYPES[precision]
    return lambda: torch.autocast(device.type, dtype=dtype)


def overflow_in_group(local: bool, group: dist.ProcessGroup | None) -> bool:
    """MAX of every rank's found-inf flag over ``group``: one decision for the whole pipeline."""
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    flag = torch.tensor([1.0 if local else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


class LossScaler:
    """Dynamic loss scale (like ``torch.amp.GradScaler``, but the decision is made by the caller
    for the whole pipeline): halve on overflow, double after ``growth_interval`` clean steps."""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000) -> None:
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler needs init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 "
                             "and growth_interval >= 1")
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0

    def unscale(self, grads: Iterable[torch.Tensor]) -> bool:
        """Divide ``grads`` by the scale in place; True if any of them holds a NaN or infinity."""
        inverse = 1.0 / self.scale
        flags = []
        for grad in grads:
            grad.mul_(inverse)
            flags.append(~torch.isfinite(grad).all())
        return any(bool(flag) for flag in flags)  # the first read waits for the device once

    def update(self, found_inf: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` clean steps in a row."""
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.clean_steps = float(state["scale"]), int(state["clean_steps"])


class ScaledStep(ABC):
    """The optimizer-step half of mixed precision, shared by PipelineRunner and LocalPipeline.

    The host class provides ``parameters()``, ``scaler`` (a :class:`LossScaler` or None) and
    ``_any_overflow(local: bool) -> bool`` (the MAX over every process of the pipeline).
    """

    scaler: LossScaler | None
    _unscaled: bool = False
    _found_inf: bool = False

    @abstractmethod
    def parameters(self) -> Iterator[nn.Parameter]:
        """This process's parameters (the host class's own method)."""

    @abstractmethod
    def _any_overflow(self, local: bool) -> bool:
        """Whether ``local`` is true on any process of the pipeline (a collective MAX)."""

    @property
    def loss_scale(self) -> float:
        """The factor the last stage multiplies its loss by before the backward (1 unless fp16)."""
        return self.scaler.scale if self.scaler is not None else 1.0

    def unscale_and_check(self) -> bool:
        """Unscale this process's gradients (once per step) and return whether any stage of the
        pipeline found a NaN or infinity. Call it before ``clip_grad_norm_`` when clipping."""
        if self.scaler is None:
            return False
        if not self._unscaled:
            grads = [p.grad for p in self.parameters() if p.grad is not None]
            self._found_inf = self._any_overflow(self.scaler.unscale(grads))
            self._unscaled = True
        return self._found_inf

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        """Step ``optimizer`` unless some stage overflowed (then every stage skips); update the
        scale. Returns whether the step was taken. Without fp16 it simply steps."""
        if self.scaler is None:
            optimizer.step()
            return True
        found = self.unscale_and_check()
        if not found:
            optimizer.step()
        self.scaler.update(found)
        self._unscaled = False
        return not found
