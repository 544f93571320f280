"""Tied parameters in a single-process pipeline.

Stages on one device may share the very same ``nn.Parameter`` (autograd then sums both uses
into its ``.grad``: nothing to do). Before the stages are moved, :func:`separate_shared` gives
a stage on another device its own copy of a ``Parameter`` it shares with an earlier stage (a
traced GPT-2's ``wte`` / ``lm_head``). Separate copies are aligned at the start, and after each
step every copy receives the sum of all copies' contributions, added in stage order, so they
never drift. A parameter that still ends up off its stage's device is an error naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import copy as shallow_copy

import torch
import torch.nn as nn

__all__ = ["LocalTies", "separate_shared"]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


def separate_shared(modules: Sequence[nn.Module], devices: Sequence[torch.device]) -> dict[str, list[int]]:
    """Replace, in each later stage on a different device, a Parameter shared with an earlier
    stage by a copy of its own; return the ties this creates (name -> stages)."""
    first_holder: dict[int, int] = {}
    ties: dict[str, list[int]] = {}
    for index, module in enumerate(modules):
        others = {id(m) for other in modules if other is not module for m in other.modules()}
        for name, parameter in list(module.named_parameters()):
            holder = first_holder.setdefault(id(parameter), index)
            if holder == index or _same_device(devices[holder], devices[index]):
                continue
            prefix, _, leaf = name.rpartition(".")
            owner = _own_path(module, prefix, others)
            setattr(owner, leaf, nn.Parameter(parameter.detach().clone(), requires_grad=parameter.requires_grad))
            ties.setdefault(name, [holder]).append(index)
    return ties


def _own_path(module: nn.Module, prefix: str, others: set[int]) -> nn.Module:
    """The submodule at ``prefix``, after replacing every module on the way that another stage
    also holds by a shallow copy of its own (so changing it leaves the other stage alone)."""
    owner = module
    for part in prefix.split(".") if prefix else []:
        child = owner.get_submodule(part)
        if id(child) in others:
            copied = shallow_copy(child)
            copied._parameters, copied._buffers, copied._modules = (
                dict(child._parameters), dict(child._buffers), dict(child._modules))
            setattr(owner, part, copied)
            child = copied
        owner = child
    return owner


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
