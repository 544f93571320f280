"""The splitting frontend: model -> :class:`Pipe`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

from .pipe import Pipe, SequentialStage, materialize
from .sequential import from_sequential, from_stage_list
from .trace import TracedPipe, TraceError, from_traced, pipe_split

__all__ = ["Pipe", "SequentialStage", "TraceError", "TracedPipe", "materialize", "pipe_split", "pipeline"]


def pipeline(model: nn.Module | Sequence[nn.Module], *, n_stages: int | None = None,
             split_points: Any = None, balance: str | Sequence[int] = "params",
             example_args: Any = None, example_kwargs: Any = None) -> Pipe:
    """Cut ``model`` into pipeline stages.

    - a list or tuple of modules: each one is a stage;
    - an ``nn.Sequential``: cut by ``balance`` (layers per stage) or into ``n_stages`` stages
      balanced by parameter count (``"params"``) or profiled time (``"time"``, on ``example_args``);
    - any other ``nn.Module``: its forward is captured with ``torch.export`` on ``example_args`` /
      ``example_kwargs`` and cut at ``split_points`` (module names, cut before them; or
      ``{name: "beginning" | "end"}``), at :func:`pipe_split` markers, or into ``n_stages``
      stages balanced among its repeated blocks (see docs/splitting.md).
    """
    if isinstance(model, (list, tuple)):
        if n_stages is not None and n_stages != len(model):
            raise ValueError(f"n_stages={n_stages} but {len(model)} stage modules were given")
        return from_stage_list(model)
    if isinstance(model, nn.Sequential):
        if split_points is not None:
            raise ValueError("split_points applies to traced models; for nn.Sequential use balance=[...]")
        return from_sequential(model, n_stages=n_stages, balance=balance, example_args=example_args,
                               example_kwargs=example_kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"conveyor.pipeline cannot cut a {type(model).__name__}: pass an nn.Module, an "
                        "nn.Sequential or a list of stage modules")
    return from_traced(model, n_stages=n_stages, split_points=split_points, balance=balance,
                       example_args=example_args, example_kwargs=example_kwargs)
