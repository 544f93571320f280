"""A single-process reference for the asynchronous schedules' semantics, to check runs against.

It knows nothing of programs, processes or the runtime: it processes micro-batches one after
another, and for each stage ``s`` of ``p`` and micro-batch ``k`` it applies the rules the papers
state:

==================  ==========================================  ==============================
schedule            weight version micro-batch ``k`` uses        stage updates after
==================  ==========================================  ==============================
pipedream           ``max(0, k - (p - s - 1))`` (newest)        every backward
 + vertical sync    ``max(0, k - (p - 1))`` on every stage       every backward
pipedream-2bw       ``max(0, k // window - 1)`` on every stage   the last of each window
==================  ==========================================  ==============================

With replicated stages (1F1B-RR, ``replicas[s]`` ranks for stage ``s``, micro-batches round
robin) a worker admits ``a = ceil(workers from s on / replicas[s])`` micro-batches, so micro-batch
``k`` uses version ``max(0, k // replicas[s] - (a - 1))`` and the stage updates once per round, on
the mean gradient of the round's ``replicas[s]`` micro-batches.

Forward and backward of ``k`` both use that version (weight stashing); an update applies the
mean gradient of the micro-batches since the stage's previous one (a partial last window too).
Sequential processing is faithful because a micro-batch only ever uses versions made by
earlier micro-batches' updates.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from .runtime.microbatch import split_batch, split_value

__all__ = ["AsyncReference"]


class AsyncReference:
    """Trains ``stages`` (modules, run in order) on a stream with asynchronous semantics."""

    def __init__(self, stages: Sequence[nn.Module], loss_fn: Callable[[Any, Any], torch.Tensor],
                 make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer], *,
                 schedule: str = "pipedream", vertical_sync: bool = False, window: int | None = None,
                 replicas: Sequence[int] | None = None, admitted: int | None = None) -> None:
        if schedule not in ("pipedream", "pipedream-2bw"):
            raise ValueError(f"no asynchronous reference for {schedule!r}")
        self.stages = list(stages)
        self.replicas = list(replicas) if replicas is not None else [1] * len(self.stages)
        self.admitted = admitted  # micro-batches in flight per input-stage worker (default: NOAM)
        self.loss_fn = loss_fn
        self.schedule = schedule
        self.vertical_sync = vertical_sync
        self.window = window or len(self.stages)
        self.optimizers = [make_optimizer([p for p in stage.parameters() if p.requires_grad])
                           for stage in self.stages]
        self.live = [{n: p for n, p in stage.named_parameters() if p.requires_grad} for stage in self.stages]
        self.versions: list[list[dict[str, torch.Tensor]]] = [[] for _ in self.stages]
        for index in range(len(self.stages)):
            self._snapshot(index)
        self.pending = [0] * len(self.stages)
        self.used_versions: list[list[int]] = [[] for _ in self.stages]

    def _snapshot(self, stage: int) -> None:
        self.versions[stage].append({n: p.detach().clone().requires_grad_(True) for n, p in self.live[stage].items()})

    def version(self, stage: int, microbatch: int) -> int:
        p = len(self.stages)
        if self.schedule == "pipedream-2bw":
            return max(0, microbatch // self.window - 1)
        if self.vertical_sync:
            return max(0, microbatch - (p - 1))
        # a worker admits ceil(downstream workers / replicas) micro-batches (p - s without
        # replicas), and a replicated stage updates once per round of its replicas
        replicas = self.replicas[stage]
        admitted = -(-sum(self.replicas[stage:]) // replicas)
        if stage == 0 and self.admitted is not None:
            admitted = self.admitted
        return max(0, microbatch // replicas - (admitted - 1))

    def updates_after(self, stage: int, microbatch: int, is_last: bool) -> bool:
        if self.schedule == "pipedream":
            return (microbatch + 1) % self.replicas[stage] == 0
        return (microbatch + 1) % self.window == 0 or is_last

    def run(self, batches: Iterable[tuple[Any, Any]], n_microbatches: int) -> list[torch.Tensor]:
        """Train on every micro-batch of ``batches``; return each micro-batch's loss."""
        microbatches = []
        for inputs, target in batches:
            inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
            parts = split_batch(inputs, {}, n_microbatches)
            targets = split_value(target, target.shape[0], n_microbatches)
            microbatches += [(args, t) for (args, _), t in zip(parts, targets)]
        losses = []
        for k, (args, target) in enumerate(microbatches):
            losses.append(self._train_one(k, args, target, is_last=k == len(microbatches) - 1))
        return losses

    def _train_one(self, k: int, args: tuple, target: Any, *, is_last: bool) -> torch.Tensor:
        used = [self.version(s, k) for s in range(len(self.stages))]
        value: Any = args
        for index, stage in enumerate(self.stages):
            weights = self.versions[index][used[index]]
            value = functional_call(stage, weights, value if index == 0 else (value,))
            self.used_versions[index].append(used[index])
        loss = self.loss_fn(value, target)
        loss.backward()
        for index in range(len(self.stages)):
            for name, tensor in self.versions[index][used[index]].items():
                if tensor.grad is not None:
                    live = self.live[index][name]
                    live.grad = tensor.grad if live.grad is None else live.grad.add_(tensor.grad)
                    tensor.grad = None
            self.pending[index] += 1
            if self.updates_after(index, k, is_last):
                self._update(index)
        return loss.detach()

    def _update(self, stage: int) -> None:
        if self.pending[stage] > 1:
            for parameter in self.live[stage].values():
                if parameter.grad is not None:
                    parameter.grad.div_(self.pending[stage])
        self.pending[stage] = 0
        self.optimizers[stage].step()
        self.optimizers[stage].zero_grad(set_to_none=True)
        self._snapshot(stage)

    def state_dict(self) -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for stage in self.stages:
            state.update(stage.state_dict())
        return state
