"""Cost models and the contiguous min-max partitioner.

Cutting ``n`` layers with costs ``c`` into ``k`` contiguous, non-empty stages so that the most
expensive stage is as cheap as possible is solved exactly by dynamic programming (as in
PipeDream's partitioner): ``best[j][i]`` is the smallest achievable maximum when the first ``i``
layers form ``j`` stages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.distributed as dist
import torch.nn as nn

__all__ = ["decide_on_rank_zero", "partition_min_max", "partition_ranges", "parameter_costs", "stage_sizes_to_bounds",
           "union_costs"]


def parameter_costs(layers: Sequence[nn.Module]) -> list[float]:
    """Number of parameter elements of each layer (a tied parameter counts once per layer).

    Works on the meta device (only shapes are read).
    """
    return [float(sum(p.numel() for p in layer.parameters())) for layer in layers]


def partition_min_max(costs: Sequence[float], n_parts: int) -> list[int]:
    """Sizes of ``n_parts`` contiguous, non-empty parts of ``costs`` minimising the largest sum.

    Among optimal partitions, ties go to the one whose parts have the most even layer counts,
    so that zero-cost layers (activations) are spread instead of piling up in one stage.
    """
    prefix = [0.0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    return partition_ranges(len(costs), n_parts, lambda start, end: prefix[end] - prefix[start])


def union_costs(units: Sequence[dict[str, int]]) -> Callable[[int, int], float]:
    """``cost(start, end)``: the parameters units ``start .. end-1`` use together, each counted
    once (a weight tied between two units of one stage is held once by that stage)."""
    table: dict[tuple[int, int], float] = {}
    for start in range(len(units)):
        seen: dict[str, int] = {}
        for end in range(start + 1, len(units) + 1):
            seen.update(units[end - 1])
            table[(start, end)] = float(sum(seen.values()))
    return lambda start, end: table[(start, end)]


def partition_ranges(n: int, n_parts: int, cost: Callable[[int, int], float]) -> list[int]:
    """Sizes of ``n_parts`` contiguous, non-empty parts of ``n`` units minimising the largest
    ``cost(start, end)`` of a part (ties: the most even unit counts)."""
    if n_parts < 1:
        raise ValueError(f"the number of stages must be at least 1, got {n_parts}")
    if n_parts > n:
        raise ValueError(
            f"cannot cut {n} layers into {n_parts} stages: every stage needs at least one layer; "
            f"use at most {n} stages"
        )
    inf = (float("inf"), float("inf"))
    # best[j][i] = (max stage cost, max layer-count imbalance) for i layers in j stages
    best = [[inf] * (n + 1) for _ in range(n_parts + 1)]
    cut = [[0] * (n + 1) for _ in range(n_parts + 1)]
    best[0][0] = (0.0, 0.0)
    even = n / n_parts
    for parts in range(1, n_parts + 1):
        for end in range(parts, n - (n_parts - parts) + 1):
            for start in range(parts - 1, end):
                previous = best[parts - 1][start]
                if previous == inf:
                    continue
                candidate = (max(previous[0], cost(start, end)), max(previous[1], abs((end - start) - even)))
                if candidate < best[parts][end]:
                    best[parts][end] = candidate
                    cut[parts][end] = start
    sizes: list[int] = []
    end = n
    for parts in range(n_parts, 0, -1):
        start = cut[parts][end]
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def stage_sizes_to_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[3, 2]`` -> ``[(0, 3), (3, 5)]``: the layer range of each stage."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


_ALONE = [False]  # True while rank 0 splits for the whole job (shipping.py): decisions are its own


def decide_on_rank_zero(decide: Callable[[], Any]) -> Any:
    """Run ``decide()`` on rank 0 of the default process group and give every rank its result.

    Profiled costs are noisy: if every rank measured its own, ranks could cut the model
    differently and hold stages that do not fit together. Without a process group (or with one
    rank) ``decide()`` simply runs here. An exception on rank 0 is raised on every rank.
    """
    if _ALONE[0] or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as error:  # shared so that the other ranks do not wait forever
            box[0] = ("error", f"{type(error).__name__}: {error}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 could not decide the split: {value}")
    return value
