"""A training script for ``conveyor train``: a small MLP regressing a fixed random function.

    conveyor train examples/train_mlp.py --stages 2 --microbatches 4 --steps 50
    conveyor plan examples/train_mlp.py --ranks 2

``conveyor train`` imports this file on every rank and calls ``build_model()`` (after seeding),
``batch(step, batch_size)`` for each step's data and ``loss_fn(output, target)`` on the last stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 32
WIDTH = 64
_TEACHER = torch.randn(WIDTH, 1, generator=torch.Generator().manual_seed(0))


def build_model() -> nn.Module:
    """An nn.Sequential: every layer is a place the pipeline may be cut."""
    return nn.Sequential(nn.Linear(WIDTH, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256),
                         nn.GELU(), nn.Linear(256, 1))


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of ``step``: the same on every rank and on a resumed run."""
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(batch_size, WIDTH, generator=generator)
    return x, torch.tanh(x @ _TEACHER)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def optimizer(parameters) -> torch.optim.Optimizer:  # noqa: ANN001 - optional: the default is AdamW(lr=1e-3)
    return torch.optim.SGD(parameters, lr=0.05, momentum=0.9)
