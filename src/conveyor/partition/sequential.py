"""Manual stage lists and ``nn.Sequential`` models, cut into contiguous stages."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .balance import decide_on_rank_zero, parameter_costs, partition_min_max, stage_sizes_to_bounds
from .pipe import Pipe, SequentialStage
from .profile import profile_times

__all__ = ["from_stage_list", "from_sequential"]


def from_stage_list(modules: Sequence[nn.Module]) -> Pipe:
    """Each module is a stage, named as in ``nn.Sequential(*modules)`` (``"0"``, ``"1"``, ...)."""
    for index, module in enumerate(modules):
        if not isinstance(module, nn.Module):
            raise TypeError(f"stage {index} is a {type(module).__name__}, not an nn.Module")
    stages = [SequentialStage(OrderedDict([(str(index), module)])) for index, module in enumerate(modules)]
    return Pipe(stages, "manual stages")


def from_sequential(model: nn.Sequential, *, n_stages: int | None = None,
                    balance: str | Sequence[int] = "params", example_args: Any = None,
                    example_kwargs: dict | None = None) -> Pipe:
    """Cut an ``nn.Sequential`` into contiguous stages.

    ``balance`` is a list of layer counts per stage, ``"params"`` to cut into ``n_stages``
    stages minimising the largest stage's parameter count, or ``"time"`` to minimise the largest
    stage's forward + backward time, profiled on ``example_args`` (on rank 0, shared with all).
    """
    names = list(model._modules)
    layers = [model._modules[name] for name in names]
    if isinstance(balance, str):
        if balance not in ("params", "time"):
            raise ValueError(f"balance={balance!r} is not supported for nn.Sequential; use 'params', 'time' "
                             "or a list of layer counts per stage")
        if n_stages is None:
            raise ValueError("give n_stages (how many stages to cut into) or balance=[layers per stage]")
        if balance == "time":
            if example_args is None and not example_kwargs:
                raise ValueError("balance='time' profiles the model and needs example inputs: pass "
                                 "example_args=(...) (a micro-batch), or use balance='params'")
            args = () if example_args is None else example_args if isinstance(example_args, tuple) else (example_args,)
            costs = decide_on_rank_zero(lambda: profile_times(layers, args, example_kwargs))
            description = "balanced by profiled forward+backward seconds"
        else:
            costs = parameter_costs(layers)
            description = "balanced by parameter count"
        sizes = partition_min_max(costs, n_stages)
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
