"""What the actions of one rank read and write: the micro-batches of a step, or of a stream.

:class:`StepData` holds one batch, cut up front. :class:`StreamFeed` pulls ``(inputs, target)``
batches from an iterator only when the program reaches a micro-batch it has not seen, so an
asynchronous pipeline can run over a stream of unknown length without draining between
batches. Every rank iterates the same batches (so all agree where the stream ends); only the
first stage's rank keeps inputs and only the last stage's rank keeps targets.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .microbatch import split_batch, split_value

__all__ = ["StepData", "StreamFeed"]


@dataclass
class StepData:
    """One batch, already cut into micro-batches, and what its actions produce."""

    microbatches: list[tuple[tuple, dict]] = field(default_factory=list)
    targets: list[Any] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, Any] = field(default_factory=dict)
    training: bool = True

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
