"""Rank functions for tests/test_dtensor_helpers.py: gradient clipping and checkpoints of
pipelines whose stages hold DTensors (FSDP2, tensor parallel, both), and replicated stages.

Every configuration trains TRAINED Adam steps on this rank's data shard, then takes one more
backward and clips it twice (inf norm with no effect, then the 2-norm below the gradient's norm);
it returns the norms and the clipped gradients whole, by the unsplit model's names."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import conveyor

from mesh_workers import N_MICROBATCHES, _replica, global_batch, parallelizer, shard_of
from models import mlp, mse

TRAINED = 2
MAX_NORM = 0.01  # far below the gradients' norm, so clipping scales them


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def reference_clipped() -> dict:
    """The unsplit model: TRAINED Adam steps on the whole batch, one more backward, clipped."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(TRAINED):
        optimizer.zero_grad()
        x, y = global_batch(step)
        mse(model(x), y).backward()
        optimizer.step()
    optimizer.zero_grad()
    x, y = global_batch(TRAINED)
    mse(model(x), y).backward()
    inf = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9, norm_type=float("inf"))
    two = torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
    return {"inf": inf, "two": two, "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "weights": {n: v.clone() for n, v in model.state_dict().items()}}


def _runner(mesh: Any, kind: str, replicas: list[int] | None = None) -> conveyor.PipelineRunner:
    if mesh is None:
        pipe = conveyor.pipeline(mlp(), n_stages=len(replicas) if replicas else dist.get_world_size())
        return conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=N_MICROBATCHES, loss_fn=mse,
                                       replicas=replicas)
    pipe = conveyor.pipeline(mlp(), n_stages=mesh["pp"].size())
    return conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=parallelizer(kind), schedule="1f1b",
                                   n_microbatches=N_MICROBATCHES, loss_fn=mse)


def _train_and_clip(runner: conveyor.PipelineRunner, mesh: Any) -> tuple[torch.optim.Optimizer, dict]:
    replica, replicas = _replica(mesh) if mesh is not None else (0, 1)
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
    for step in range(TRAINED + 1):
        optimizer.zero_grad()
        x, y = global_batch(step)
        runner.step(shard_of(x, replica, replicas), target=shard_of(y, replica, replicas))
        if step < TRAINED:
            optimizer.step()
    inf = runner.clip_grad_norm_(1e9, norm_type=float("inf"))
    two = runner.clip_grad_norm_(MAX_NORM)
    assert type(inf) is torch.Tensor and type(two) is torch.Tensor  # plain tensors, not DTensors
    grads = {name: _whole(p.grad) for name, p in runner.named_parameters()}
    return optimizer, {"inf": inf, "two": two, "grads": grads}


@contextmanager
def _all_reduces() -> Iterator[list[Any]]:
    """The group of every ``dist.all_reduce`` called inside."""
    groups: list[Any] = []
    original = dist.all_reduce

    def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        groups.append(kwargs.get("group"))
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counted
    try:
        yield groups
    finally:
        dist.all_reduce = original


def held(runner: conveyor.PipelineRunner, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's model tensors and optimizer state, whole, by the unsplit model's names."""
    names = {id(p): n for n, p in runner.named_parameters()}
    state = {names[id(p)]: {k: _whole(v) for k, v in s.items()} for p, s in optimizer.state.items()}
    return {"model": {k: _whole(v) for k, v in runner.state_dict().items()}, "optim": state}


def save_3d(rank: int, world_size: int, path: str) -> dict:
    """pp2 x dp2 x tp2, FSDP2 + TP stages: clip, then save (weights and Adam state after TRAINED
    steps), then load the checkpoint back into a fresh runner of the same layout; then clip on
    pp2 x dp_replicate2 x dp_shard2 (HSDP: sharded and replicated placements)."""
    torch.set_num_threads(1)
    mesh = conveyor.mesh(pp=2, dp=2, tp=2)
    runner = _runner(mesh, "fsdp")
    optimizer, clipped = _train_and_clip(runner, mesh)
    runner.save(path, optimizer, step=TRAINED)
    saved = held(runner, optimizer)
    fresh = _runner(mesh, "fsdp")
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh.load(path, fresh_optimizer)
    hsdp = conveyor.mesh(pp=2, dp_replicate=2, dp_shard=2)
    return {"clipped": clipped, "saved": saved, "reloaded": held(fresh, fresh_optimizer),
            "hsdp": _train_and_clip(_runner(hsdp, "hsdp"), hsdp)[1]}


def four_ranks(rank: int, world_size: int, path: str) -> dict:
    """Clipping on pp2 x dp2 (FSDP2, DDP), pp2 x tp2, replicas=[2, 2] (counting the all-reduces
    over the replicas' group) and replicas=[2, 1] on a group of ranks 0-2; the 3-D checkpoint at
    ``path`` loaded into pp4 and into pp2 x dp2 with FSDP2, each then taking one more step."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    dp_mesh = conveyor.mesh(pp=2, dp=2)
    tp_mesh = conveyor.mesh(pp=2, tp=2)
    for label, mesh, kind in (("pp2xdp2-fsdp", dp_mesh, "fsdp"), ("pp2xdp2-ddp", dp_mesh, "ddp"),
                              ("pp2xtp2", tp_mesh, "tp")):
        out[label] = _train_and_clip(_runner(mesh, kind), mesh)[1]
    runner = _runner(None, "", [2, 2])
    replica_group = next(iter(runner._replicas.values())).collective
    with _all_reduces() as groups:
        out["replicas"] = _train_and_clip(runner, None)[1]
    out["replica all-reduces"] = sum(group is replica_group for group in groups)
    subgroup = dist.new_group([0, 1, 2])  # a pipeline on part of the job: its replicas sum point to point
    if rank < 3:
        runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="1f1b", group=subgroup,
                                         n_microbatches=N_MICROBATCHES, loss_fn=mse, replicas=[2, 1])
        assert all(each.collective is None for each in runner._replicas.values())
        out["replicas-subgroup"] = _train_and_clip(runner, None)[1]
    for label, mesh, kind in (("pp4", None, ""), ("pp2xdp2-fsdp", dp_mesh, "fsdp")):
        runner = _runner(mesh, kind)
        optimizer = torch.optim.Adam(runner.parameters(), lr=0.5)
        runner.load(path, optimizer)
        out[f"loaded-{label}"] = held(runner, optimizer)
        replica, replicas = _replica(mesh) if mesh is not None else (0, 1)
        x, y = global_batch(TRAINED)  # one more step from the loaded weights and Adam state
        runner.step(shard_of(x, replica, replicas), target=shard_of(y, replica, replicas))
        optimizer.step()
        out[f"trained-{label}"] = {name: _whole(value) for name, value in runner.state_dict().items()}
    return out


def adam_of(model: nn.Module) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=0.5)
