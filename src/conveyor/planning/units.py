"""The units a model can be cut between: the layers of an ``nn.Sequential``, or the blocks the
traced splitter balances among (``partition/trace.py``), as runnable modules.

A pipeline's stage ``j`` is a run of consecutive units, so ``conveyor.pipeline(model,
balance=[units per stage], ...)`` rebuilds exactly the stages the planner costed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

__all__ = ["Units", "cuttable_units"]


@dataclass
class Units:
    """``modules[i]`` runs unit ``i``: unit 0 on the model's inputs, unit ``i`` on unit ``i-1``'s output."""

    names: list[str]
    modules: list[nn.Module]
    kind: str  # "layers of nn.Sequential" or the traced splitter's description ("the 12 blocks of ...")


def cuttable_units(model: nn.Module | Sequence[nn.Module], example_args: tuple,
                   example_kwargs: dict | None = None) -> Units:
    """Split ``model`` into its cuttable units (tracing it with ``torch.export`` unless it is an
    ``nn.Sequential`` or a list of modules)."""
    if isinstance(model, (list, tuple)):
        return Units([str(i) for i in range(len(model))], list(model), "manual stages")
    if isinstance(model, nn.Sequential):
        names = list(model._modules)
        return Units(names, [model._modules[name] for name in names], "layers of nn.Sequential")
    from ..partition.graph_split import build_stage, plan_stages
    from ..partition.trace import _blocks, _spans, capture

    captured = capture(model, example_args, example_kwargs)
    what, blocks = _blocks(captured)
    spans = _spans(captured)
    units = plan_stages(captured, [spans[block][0] for block in blocks[1:]])
    modules: list[Any] = [build_stage(captured, units, i)[0] for i in range(units.n_stages)]
    return Units(blocks, modules, what)
