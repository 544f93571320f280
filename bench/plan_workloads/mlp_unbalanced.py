"""Issue 20's MLP, whose cost sits in its last layers: Linear(64, 64) x3, Linear(64, 512),
Linear(512, 512), Linear(512, 1), ReLUs between; batch 512, MSE."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 512


def build_model() -> nn.Module:
    widths = [64, 64, 64, 64, 512, 512, 1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(batch_size, 64, generator=generator)
    return x, x[:, :1].clone()


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)
