"""The splitting frontend: model -> :class:`Pipe`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .pipe import Pipe, SequentialStage, materialize
from .sequential import from_sequential, from_stage_list

__all__ = ["Pipe", "SequentialStage", "materialize", "pipeline"]


def pipeline(model: nn.Module | Sequence[nn.Module], *, n_stages: int | None = None,
             split_points: Any = None, balance: str | Sequence[int] = "params",
             example_args: Any = None, example_kwargs: Any = None) -> Pipe:
    """Cut ``model`` into pipeline stages.

    - a list or tuple of modules: each one is a stage;
    - an ``nn.Sequential``: cut by ``balance`` (layers per stage) or into ``n_stages`` stages
      balanced by parameter count.
    """
    if isinstance(model, (list, tuple)):
        if n_stages is not None and n_stages != len(model):
            raise ValueError(f"n_stages={n_stages} but {len(model)} stage modules were given")
        return from_stage_list(model)
    if isinstance(model, nn.Sequential):
        if split_points is not None:
            raise ValueError("split_points applies to traced models; for nn.Sequential use balance=[...]")
        return from_sequential(model, n_stages=n_stages, balance=balance)
    raise TypeError(
        f"conveyor.pipeline cannot cut a {type(model).__name__} yet: pass a list of stage modules or an "
        "nn.Sequential (traced splitting of arbitrary modules is not available in this version)"
    )
