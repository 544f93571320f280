"""Tied parameters in a single-process pipeline.

Stages on one device may share the very same ``nn.Parameter`` (autograd then sums both uses
into its ``.grad``: nothing to do). Stages whose tied parameter is a separate copy (a traced
split holds one per stage) get the copies aligned at the start, and after each step every copy
receives the sum of all copies' contributions, added in stage order, so they never drift. One
``Parameter`` object spread over stages on different devices cannot work (moving one stage
moves it for the other): that is an error naming the parameter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

__all__ = ["LocalTies"]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def _check_devices(modules: Sequence[nn.Module], devices: Sequence[torch.device]) -> None:
    for index, (module, device) in enumerate(zip(modules, devices)):
        for name, parameter in module.named_parameters():
            if not _same_device(parameter.device, device):
                raise ValueError(
                    f"parameter {name} of stage {index} is on {parameter.device}, not on the stage's device {device}: "
                    "one Parameter object is shared by stages placed on different devices; give each stage its "
                    "own copy (and record the tie in pipe.ties) or place those stages on one device")


class LocalTies:
    """The ties whose copies are separate tensors: aligned once, gradients summed every step."""

    def __init__(self, ties: Mapping[str, Sequence[int]], modules: Sequence[nn.Module],
                 devices: Sequence[torch.device]) -> None:
        _check_devices(modules, devices)
        self._copies: list[tuple[str, list[nn.Parameter]]] = []
        for name, stages in sorted(ties.items()):
            copies: list[nn.Parameter] = []
            for stage in sorted(stages):
                parameter = dict(modules[stage].named_parameters()).get(name)
                if parameter is not None and all(parameter is not c for c in copies):
                    copies.append(parameter)
            if len(copies) > 1:
                self._copies.append((name, copies))
        self._previous: dict[str, list[torch.Tensor | None]] = {}
        with torch.no_grad():
            for _, copies in self._copies:
                for copy in copies[1:]:
                    copy.copy_(copies[0])

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._copies]

    def before_step(self) -> None:
        """Set accumulated gradients aside so the step's contributions can be summed alone."""
        self._previous = {}
        for name, copies in self._copies:
            self._previous[name] = [copy.grad for copy in copies]
            for copy in copies:
                copy.grad = None

    def after_step(self) -> None:
        """Give every copy the sum of this step's contributions (plus what it held before)."""
        for name, copies in self._copies:
            total: torch.Tensor | None = None
            for copy in copies:
                part = copy.grad if copy.grad is not None else torch.zeros_like(copy)
                part = part.to(copies[0].device)
                total = part.clone() if total is None else total + part
            assert total is not None
            for copy, previous in zip(copies, self._previous.get(name, [None] * len(copies))):
                mine = total.to(copy.device)
                copy.grad = mine if previous is None else previous + mine
