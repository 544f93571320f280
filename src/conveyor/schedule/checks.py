"""Argument checks shared by the schedule generators."""

from __future__ import annotations

__all__ = ["require_one_stage_per_rank"]


def require_one_stage_per_rank(name: str, n_ranks: int, n_stages: int) -> None:
    if n_stages != n_ranks:
        raise ValueError(
            f"schedule {name!r} places one stage per rank, but the pipe has {n_stages} stages for "
            f"{n_ranks} ranks: cut the model into {n_ranks} stages (pipeline(..., n_stages={n_ranks})) "
            f"or run on {n_stages} ranks"
        )
