"""Rank functions for the asynchronous-schedule tests (importable by worker processes)."""

from __future__ import annotations

import torch

import conveyor

from models import batch, mlp, mse

N_MICROBATCHES = 2
LR = 0.05


def stream_batches(n_batches: int, rows: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [batch(100 + index, rows=rows) for index in range(n_batches)]


def make_optimizer(parameters) -> torch.optim.Optimizer:  # noqa: ANN001 - any iterable of parameters
    return torch.optim.Adam(parameters, lr=LR)


def stream_train(rank: int, world_size: int, schedule: str, options: dict, n_batches: int,
                 lr: float = LR) -> dict:
    """Stream ``n_batches`` batches of N_MICROBATCHES micro-batches through ``schedule``."""
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=N_MICROBATCHES, loss_fn=mse,
                                     **options)
    optimizer = torch.optim.Adam(runner.parameters(), lr=lr)
    losses = list(runner.stream(stream_batches(n_batches), optimizer))
    return {"weights": runner.state_dict(), "losses": losses, "versions": runner.peak_versions,
            "trace": [event.action for event in runner.trace]}


def first_gradients(rank: int, world_size: int, schedule: str, n_batches: int) -> dict:
    """The gradient each stage applies in its first update, with lr=0 (weights never move)."""
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=N_MICROBATCHES, loss_fn=mse)
    grads: dict[str, torch.Tensor] = {}
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.0)

    def record(_: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for name, parameter in runner.named_parameters():
            if parameter.grad is not None:
                grads[name] = grads.get(name, 0) + parameter.grad.clone()

    optimizer.register_step_pre_hook(record)
    for _ in runner.stream(stream_batches(n_batches), optimizer):
        pass
    return grads


def replicated_stream(rank: int, world_size: int, replicas: list[int], n_batches: int,
                      admitted: int | None = None) -> dict:
    """1F1B-RR: pipedream over len(replicas) stages with replicas[s] ranks for stage s."""
    pipe = conveyor.pipeline(mlp(), n_stages=len(replicas))
    runner = conveyor.PipelineRunner(pipe, schedule="pipedream", n_microbatches=N_MICROBATCHES, loss_fn=mse,
                                     replicas=replicas, admitted=admitted)
    optimizer = torch.optim.Adam(runner.parameters(), lr=LR)
    losses = list(runner.stream(stream_batches(n_batches), optimizer))
    return {"weights": runner.state_dict(), "losses": losses, "stages": sorted(runner.stages)}


def replicated_steps(rank: int, world_size: int, schedule: str, replicas: list[int], steps: int) -> dict:
    """Synchronous schedule with replicated stages (pipeline x data parallelism)."""
    pipe = conveyor.pipeline(mlp(), n_stages=len(replicas))
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=4, loss_fn=mse, replicas=replicas)
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
    grads, losses = {}, []
    for step in range(steps):
        optimizer.zero_grad()
        losses.append(runner.step(*batch(step)[:1], target=batch(step)[1]))
        if step == 0:
            grads = {name: p.grad.clone() for name, p in runner.named_parameters()}
        optimizer.step()
    return {"weights": runner.state_dict(), "grads": grads, "losses": losses}


def drain_save_resume(rank: int, world_size: int, path: str, resume: bool) -> dict:
    """Two streams of 4 batches each (the pipeline drains at the end of a stream). With
    ``resume``, the second runs in a fresh runner and optimizer loaded from a checkpoint saved
    after the first; otherwise both run straight in one runner."""
    batches = stream_batches(8)
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="pipedream",
                                     n_microbatches=N_MICROBATCHES, loss_fn=mse)
    optimizer = torch.optim.Adam(runner.parameters(), lr=LR)
    list(runner.stream(batches[:4], optimizer))
    if resume:
        runner.save(path, optimizer)
        runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(seed=1), n_stages=world_size),
                                         schedule="pipedream", n_microbatches=N_MICROBATCHES, loss_fn=mse)
        optimizer = torch.optim.Adam(runner.parameters(), lr=LR)
        runner.load(path, optimizer)
    losses = list(runner.stream(batches[4:], optimizer))
    return {"weights": runner.state_dict(), "losses": losses}


def misuse(rank: int, world_size: int, case: str) -> str:
    """The message of the error a misuse raises on every rank."""
    try:
        if case == "step-on-async":
            runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="pipedream",
                                             n_microbatches=2, loss_fn=mse)
            runner.step(*batch(0)[:1], target=batch(0)[1])
        elif case == "stream-on-sync":
            runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b",
                                             n_microbatches=2, loss_fn=mse)
            list(runner.stream(stream_batches(1), torch.optim.SGD(runner.parameters(), lr=0.1)))
    except ValueError as error:
        return str(error)
    return "no error"


def replicated_save(rank: int, world_size: int, path: str) -> dict:
    """Train 2 steps with replicas [2, 2] and save: each stage's replicas hold the same tensors."""
    pipe = conveyor.pipeline(mlp(), n_stages=2)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=4, loss_fn=mse, replicas=[2, 2])
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
    for step in range(2):
        optimizer.zero_grad()
        inputs, target = batch(step)
        runner.step(inputs, target=target)
        optimizer.step()
    runner.save(path, optimizer, step=2)
    return runner.state_dict()
