"""A tiny training script for ``conveyor plan SCRIPT.py`` tests: an ``nn.Sequential`` MLP small
enough to profile and run in a moment (the format of examples/train_mlp.py)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 8
WIDTH = 8


def build_model() -> nn.Module:
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                         nn.Linear(WIDTH, 1)).double()


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, WIDTH, generator=generator, dtype=torch.float64)
    return x, x.sum(dim=1, keepdim=True)


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)
