"""Pipe: a model cut into stage modules that keep the unsplit model's parameter names."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

__all__ = ["ALIASES", "Pipe", "SequentialStage", "materialize", "stage_aliases", "state_aliases"]

ALIASES = "_conveyor_state_aliases"  # attribute of a stage module: {alias name: name it holds the tensor under}


def state_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: name}`` for every ``state_dict`` entry of ``module`` that is the same tensor as an
    earlier entry (a tied weight: ``head.weight`` -> ``embed.weight``)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(value), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def stage_aliases(module: nn.Module) -> dict[str, str]:
    """The aliases a stage module answers for in its holder's ``state_dict`` (set when cutting)."""
    return dict(getattr(module, ALIASES, {}))


class SequentialStage(nn.Module):
    """A run of consecutive layers registered under their original names.

    Called like ``nn.Sequential``: the first layer receives ``(*args, **kwargs)``, every other
    layer the previous layer's output. A stage after the first receives the previous stage's
    output as its single argument, exactly as the unsplit ``nn.Sequential`` would pass it.
    """

    def __init__(self, layers: OrderedDict[str, nn.Module]) -> None:
        super().__init__()
        if not layers:
            raise ValueError("a stage needs at least one layer")
        for name, layer in layers.items():
            self.add_module(name, layer)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        layers = iter(self._modules.values())
        output = next(layers)(*args, **kwargs)
        for layer in layers:
            output = layer(output)
        return output


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Pipe:
    """A model cut into ``n_stages`` stage modules.

    ``stage_module(i)`` is stage ``i``; its ``named_parameters()`` and ``named_buffers()`` use
    the unsplit model's names. Stage 0 is called with the user's inputs, every later stage with
    the previous stage's output.
    """

    def __init__(self, stages: Sequence[nn.Module], description: str = "",
                 costs: Sequence[float] | None = None) -> None:
        if not stages:
            raise ValueError("a pipe needs at least one stage")
        self._stages = list(stages)
        self.description = description
        self.costs = list(costs) if costs is not None else None

    @property
    def n_stages(self) -> int:
        return len(self._stages)

    def stage_module(self, index: int) -> nn.Module:
        if not 0 <= index < self.n_stages:
            raise IndexError(f"stage {index} does not exist: the pipe has stages 0..{self.n_stages - 1}")
        return self._stages[index]

    def __len__(self) -> int:
        return self.n_stages

    def __repr__(self) -> str:
        lines = [f"Pipe: {self.n_stages} stages" + (f" ({self.description})" if self.description else "")]
        total = sum(_count(stage) for stage in self._stages) or 1
        for index, stage in enumerate(self._stages):
            names = list(stage._modules) if isinstance(stage, SequentialStage) else [type(stage).__name__]
            shown = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]} ({len(names)} layers)"
            params = _count(stage)
            cost = f", cost {self.costs[index]:.4g}" if self.costs else ""
            lines.append(f"  stage {index}: {shown}, {params:,} parameters ({100 * params / total:.1f}%){cost}")
        return "\n".join(lines)


def is_meta(module: nn.Module) -> bool:
    """Whether any parameter or buffer of ``module`` is on the meta device (has no storage)."""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def materialize(module: nn.Module, device: torch.device | str = "cpu",
                init_fn: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Give a module built on the meta device real storage on ``device``, in place.

    Storage is allocated with ``to_empty``; then ``init_fn(module)`` runs if given, else every
    submodule's ``reset_parameters()`` (the convention of ``torch.nn`` layers). Buffers that no
    ``reset_parameters`` fills stay uninitialised: pass ``init_fn`` or load a checkpoint.
    A module with no meta tensors is only moved to ``device``.
    """
    if not is_meta(module):
        return module.to(device)
    module.to_empty(device=device)
    if init_fn is not None:
        init_fn(module)
    else:
        with torch.no_grad():
            for submodule in module.modules():
                reset = getattr(submodule, "reset_parameters", None)
                if callable(reset):
                    reset()
    return module
