"""Argument checks shared by the schedule generators."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["in_flight", "replica_groups", "require_one_stage_per_rank", "v_placement"]


def require_one_stage_per_rank(name: str, n_ranks: int, n_stages: int) -> None:
    if n_stages != n_ranks:
        raise ValueError(
            f"schedule {name!r} places one stage per rank, but the pipe has {n_stages} stages for "
            f"{n_ranks} ranks: cut the model into {n_ranks} stages (pipeline(..., n_stages={n_ranks})) "
            f"or run on {n_stages} ranks"
        )


def replica_groups(name: str, n_ranks: int, n_stages: int,
                   replicas: Sequence[int] | None) -> tuple[tuple[int, ...], ...]:
    """The ranks of each stage: one each by default, or ``replicas[s]`` consecutive ranks."""
    if replicas is None:
        require_one_stage_per_rank(name, n_ranks, n_stages)
        return tuple((stage,) for stage in range(n_stages))
    if len(replicas) != n_stages or any(count < 1 for count in replicas):
        raise ValueError(f"replicas={list(replicas)} must give each of the {n_stages} stages at least one rank")
    if sum(replicas) != n_ranks:
        raise ValueError(f"replicas={list(replicas)} places stages on {sum(replicas)} ranks, but there are "
                         f"{n_ranks}: make the counts add up to {n_ranks}")
    groups, first = [], 0
    for count in replicas:
        groups.append(tuple(range(first, first + count)))
        first += count
    return tuple(groups)


def in_flight(groups: Sequence[Sequence[int]], stage: int) -> int:
    """Micro-batches a worker of ``stage`` admits before its first backward: the workers from
    this stage to the end over this stage's replicas, rounded up (PipeDream's NOAM; ``p - s``
    without replicas)."""
    downstream = sum(len(group) for group in groups[stage:])
    return -(-downstream // len(groups[stage]))


def v_placement(name: str, n_ranks: int, n_stages: int) -> tuple[int, ...]:
    """The V placement (rank ``r`` holds stages ``r`` and ``2p - 1 - r``), or an error naming the fix."""
    if n_stages != 2 * n_ranks:
        raise ValueError(
            f"{name} places two stages per rank (rank r holds stages r and {2 * n_ranks} - 1 - r), but the "
            f"pipe has {n_stages} stages for {n_ranks} ranks: cut the model into {2 * n_ranks} stages "
            f"(pipeline(..., n_stages={2 * n_ranks})), or pass n_ranks={n_stages // 2} to simulate"
        )
    return tuple(stage if stage < n_ranks else n_stages - 1 - stage for stage in range(n_stages))
