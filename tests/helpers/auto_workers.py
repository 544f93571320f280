"""Rank functions for PipelineRunner(schedule="auto")."""

from __future__ import annotations

import torch

import conveyor
from conveyor.schedule import Schedule

from models import batch, mlp, mse

STEPS = 2


def _train(schedule: str | Schedule, world_size: int, dropout: float, recompute: bool) -> dict:
    model = mlp(layers=2 * world_size, dropout=dropout)
    torch.manual_seed(1234)  # the same random stream for dropout in every run
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=world_size), schedule=schedule,
                                     n_microbatches=6, loss_fn=mse, recompute=recompute)
    grads, losses = [], []
    for step in range(STEPS):
        for parameter in runner.parameters():
            parameter.grad = None
        x, y = batch(step)
        losses.append(runner.step(x, target=y))
        grads.append({name: p.grad.clone() for name, p in runner.named_parameters()})
    program = runner.schedule.to_text()
    profile = runner.auto_profile
    runner.close()
    return {"grads": grads, "losses": losses, "program": program, "profile": profile}


def auto_and_explicit(rank: int, world_size: int, dropout: float, recompute: bool) -> dict:
    """The auto runner's two steps, and the same two steps on the program it chose, given explicitly."""
    auto = _train("auto", world_size, dropout, recompute)
    explicit = _train(Schedule.from_text(auto["program"]), world_size, dropout, recompute)
    return {"auto": auto, "explicit": explicit}
