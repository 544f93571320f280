"""Manual stage lists and ``nn.Sequential`` models, cut into contiguous stages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch.nn as nn

from .balance import parameter_costs, partition_min_max, stage_sizes_to_bounds
from .pipe import Pipe, SequentialStage

__all__ = ["from_stage_list", "from_sequential"]


def from_stage_list(modules: Sequence[nn.Module]) -> Pipe:
    """Each module is a stage, named as in ``nn.Sequential(*modules)`` (``"0"``, ``"1"``, ...)."""
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {index} is a {type(module).__name__}, not an nn.Module")
    stages = [SequentialStage(OrderedDict([(str(index), module)])) for index, module in enumerate(modules)]
    return Pipe(stages, "manual stages")


def from_sequential(model: nn.Sequential, *, n_stages: int | None = None,
                    balance: str | Sequence[int] = "params") -> Pipe:
    """Cut an ``nn.Sequential`` into contiguous stages.

    ``balance`` is a list of layer counts per stage, or ``"params"`` to cut into ``n_stages``
    stages minimising the largest stage's parameter count.
    """
    names = list(model._modules)
    layers = [model._modules[name] for name in names]
    if isinstance(balance, str):
        if balance != "params":
            raise ValueError(f"balance={balance!r} is not supported for nn.Sequential here; use 'params' "
                             "or a list of layer counts per stage")
        if n_stages is None:
            raise ValueError("give n_stages (how many stages to cut into) or balance=[layers per stage]")
        costs = parameter_costs(layers)
        sizes = partition_min_max(costs, n_stages)
        description = "balanced by parameter count"
    else:
        sizes = [int(size) for size in balance]
        if any(size < 1 for size in sizes):
            raise ValueError(f"balance={list(balance)} has an empty stage; every stage needs at least one layer")
        if sum(sizes) != len(layers):
            raise ValueError(f"balance={list(balance)} covers {sum(sizes)} layers but the model has "
                             f"{len(layers)}; make the counts add up to {len(layers)}")
        if n_stages is not None and n_stages != len(sizes):
            raise ValueError(f"n_stages={n_stages} disagrees with balance={list(balance)} ({len(sizes)} stages)")
        costs = parameter_costs(layers)
        description = f"balance {sizes}"
    stages = [SequentialStage(OrderedDict((names[i], layers[i]) for i in range(start, end)))
              for start, end in stage_sizes_to_bounds(sizes)]
    stage_costs = [sum(costs[start:end]) for start, end in stage_sizes_to_bounds(sizes)]
    return Pipe(stages, description, stage_costs)
