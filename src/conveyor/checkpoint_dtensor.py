"""Checkpoints of sharded stages: DTensors (FSDP2, tensor parallel) go to disk whole.

Saving gathers each DTensor with ``full_tensor()`` (a collective over its own mesh: every rank
holding the stage takes part, in the same order); the lowest rank of the job holding a name
writes it, so one rank of each data/tensor-parallel group writes a given tensor. Loading reads
the whole tensor and keeps this rank's shard with ``distribute_tensor`` (no communication:
every rank read the whole tensor). The files are those of any other checkpoint, so
``conveyor.load_full`` and every layout read them.

A runner on a mesh saves and loads over the whole mesh (its ``pp`` group is one pipeline of
many), which must be the whole job: ranks are the job's.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from .errors import CheckpointError

__all__ = ["is_dtensor", "full", "job_of", "shard_like", "whole_share"]

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor, distribute_tensor  # type: ignore[no-redef]

_LOCAL_SPLIT = "src_data_rank" in inspect.signature(distribute_tensor).parameters


def is_dtensor(value: Any) -> bool:
    return isinstance(value, DTensor)


def full(value: torch.Tensor) -> torch.Tensor:
    """``value`` whole: a DTensor gathered (collective over its mesh), a plain tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def shard_like(whole: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``current``: a DTensor with its mesh and placements (this rank's
    shard cut locally), or ``whole`` itself where ``current`` is a plain tensor."""
    if not isinstance(current, DTensor):
        return whole
    whole = whole.to(current.to_local().device)
    if _LOCAL_SPLIT:
        return distribute_tensor(whole, current.device_mesh, current.placements, src_data_rank=None)
    return distribute_tensor(whole, current.device_mesh, current.placements)  # pragma: no cover - older torch


def job_of(runner: Any) -> tuple[int, int, Callable[[Any], list[Any]]]:
    """(rank, world size, all_gather_object) over every rank that saves ``runner``'s checkpoint:
    the runner's group, or with a mesh the whole job (which the mesh must span)."""
    mesh = getattr(runner, "mesh", None)
    group = runner.group
    if mesh is not None:
        if mesh.size() != dist.get_world_size():
            raise CheckpointError(f"checkpoints of a runner on a mesh of {mesh.size()} ranks in a job of "
                                  f"{dist.get_world_size()} ranks are not supported: build the mesh over the whole "
                                  "job (conveyor.mesh(pp=..., dp=..., tp=...))")
        group = None
    size = dist.get_world_size(group)

    def gather(value: Any) -> list[Any]:
        out: list[Any] = [None] * size
        dist.all_gather_object(out, value, group=group)
        return out

    return dist.get_rank(group), size, gather


def whole_share(state: Mapping[str, torch.Tensor], writes: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The values this rank ``writes``, whole. Every DTensor is gathered, in the mapping's order
    (the same on every rank holding it: the gather is collective), and dropped at once where
    another rank writes it, so a rank holds at most one whole tensor it does not write."""
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        whole = full(value)
        if writes(name):
            out[name] = whole
    return out
