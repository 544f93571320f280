"""What the actions of one rank read and write: the micro-batches of a step, or of a stream.

:class:`StepData` holds one batch, cut up front. :class:`StreamFeed` pulls ``(inputs, target)``
batches from an iterator only when the program reaches a micro-batch it has not seen, so an
asynchronous pipeline can run over a stream of unknown length without draining between
batches. Every rank iterates the same batches (so all agree where the stream ends); only the
first stage's rank keeps inputs and only the last stage's rank keeps targets.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .bundle import flatten
from .microbatch import loss_weights, split_batch, split_value

__all__ = ["StepData", "StreamFeed", "first_dim"]


def first_dim(value: Any) -> int:
    """The batch size of a target: dim 0 of its first tensor."""
    tensors = flatten(value, "target")[1]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("the target needs a batch dimension (dim 0) to split into micro-batches")
    return tensors[0].shape[0]


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@dataclass
class StepData:
    """One batch, already cut into micro-batches, and what its actions produce."""

    microbatches: list[tuple[tuple, dict]] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    weights: Sequence[float] = field(default_factory=list)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)
    training: bool = True

    @classmethod
    def cut(cls, inputs: tuple, kwargs: dict, target: Any, n_microbatches: int, *,
            inputs_to: torch.device | None, targets_to: torch.device | None, loss_weighting: str,
            ignore_index: int) -> StepData:
        """One batch cut into micro-batches: the inputs moved to ``inputs_to`` (None: not kept
        here), the target (None: forward only) to ``targets_to`` with each micro-batch's loss weight."""
        data = cls(training=target is not None)
        if inputs_to is not None:
            moved = tuple(_to(x, inputs_to) for x in inputs)
            data.microbatches = split_batch(moved, {k: _to(v, inputs_to) for k, v in kwargs.items()}, n_microbatches)
        if target is not None and targets_to is not None:
            target = _to(target, targets_to)
            size = first_dim(target)
            if size < n_microbatches:
                raise ValueError(f"the target has {size} rows, fewer than {n_microbatches} micro-batches")
            data.targets = split_value(target, size, n_microbatches)
            data.weights = loss_weights(data.targets, loss_weighting, ignore_index)
        return data

    def loss_sum(self) -> tuple[torch.Tensor, torch.dtype]:
        """The batch loss, the micro-batch losses weighted and summed in float64, and their dtype."""
        first = next(iter(self.losses.values()))
        total = sum((self.losses[i].double() * self.weights[i] for i in sorted(self.losses)),
                    torch.tensor(0.0, dtype=torch.float64, device=first.device))
        return total, first.dtype

    def inputs(self, microbatch: int) -> tuple[tuple, dict]:
        return self.microbatches[microbatch]

    def target(self, microbatch: int) -> tuple[Any, float]:
        """The target of ``microbatch`` and its loss weight."""
        return self.targets[microbatch], self.weights[microbatch]

    def record(self, microbatch: int, result: Any) -> None:
        (self.losses if self.training else self.outputs)[microbatch] = result


class StreamFeed:
    """Micro-batches drawn lazily from an iterator of ``(inputs, target)`` batches."""

    training = True

    def __init__(self, batches: Iterator[Any], n_microbatches: int, device: torch.device, *,
                 keeps_inputs: bool, keeps_targets: bool) -> None:
        self.batches = batches
        self.n_microbatches = n_microbatches
        self.device = device
        self.keeps_inputs = keeps_inputs
        self.keeps_targets = keeps_targets
        self.available = 0
        self.exhausted = False
        self._inputs: dict[int, tuple[tuple, dict]] = {}
        self._targets: dict[int, Any] = {}
        self.losses: dict[int, torch.Tensor] = {}

    def exists(self, microbatch: int) -> bool:
        """Whether the stream has micro-batch ``microbatch`` (pulling batches until it knows)."""
        while microbatch >= self.available and not self.exhausted:
            self._pull()
        return microbatch < self.available

    def _pull(self) -> None:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.exhausted = True
            return
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise TypeError(f"stream() expects batches of (inputs, target); got {type(batch).__name__}")
        inputs, target = batch
        inputs = tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)
        first = self.available
        if self.keeps_inputs:
            inputs = tuple(x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs)
            for offset, part in enumerate(split_batch(inputs, {}, self.n_microbatches)):
                self._inputs[first + offset] = part
        if self.keeps_targets:
            target = target.to(self.device) if isinstance(target, torch.Tensor) else target
            size = target.shape[0] if isinstance(target, torch.Tensor) and target.dim() else 0
            if size < self.n_microbatches:
                raise ValueError(f"a target of {size} rows cannot be split into {self.n_microbatches} micro-batches")
            for offset, part in enumerate(split_value(target, size, self.n_microbatches)):
                self._targets[first + offset] = part
        self.available += self.n_microbatches

    def inputs(self, microbatch: int) -> tuple[tuple, dict]:
        self.exists(microbatch)
        return self._inputs.pop(microbatch)

    def target(self, microbatch: int) -> tuple[Any, float]:
        """Each micro-batch's mean loss counts whole: an update averages over its micro-batches."""
        self.exists(microbatch)
        return self._targets.pop(microbatch), 1.0

    def record(self, microbatch: int, result: Any) -> None:
        self.losses[microbatch] = result
