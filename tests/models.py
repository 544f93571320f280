"""Small models and data shared by the tests (importable by worker processes)."""

from __future__ import annotations

import torch
import torch.nn as nn

DTYPE = torch.float64
WIDTH = 6


def mlp(seed: int = 0, layers: int = 8, dropout: float = 0.0) -> nn.Sequential:
    """An 8-layer float64 MLP: alternating Linear and Tanh (or Dropout), odd layers free of params."""
    torch.manual_seed(seed)
    modules: list[nn.Module] = []
    for index in range(layers):
        if index % 2 == 0:
            modules.append(nn.Linear(WIDTH, WIDTH, dtype=DTYPE))
        else:
            modules.append(nn.Dropout(dropout) if dropout else nn.Tanh())
    return nn.Sequential(*modules)


def batch(seed: int, rows: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, WIDTH, dtype=DTYPE, generator=generator),
            torch.randn(rows, WIDTH, dtype=DTYPE, generator=generator))


def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


class MaskedEmbed(nn.Module):
    """Stage 0 of the tuple-boundary model: returns (hidden, integer ids, bool mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, WIDTH, dtype=DTYPE)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.embed(ids), ids, ids > 4


class MaskedMix(nn.Module):
    """Stage 1: uses the ids and the mask that crossed the boundary."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, value: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, ids, mask = value
        return self.linear(hidden) * mask.unsqueeze(-1) + ids.unsqueeze(-1).to(hidden.dtype)


class MeanPool(nn.Module):
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.mean(dim=1)


def masked_model(seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [MaskedEmbed(), MaskedMix(), MeanPool()]


def reference_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = mse(model(x), y)
    loss.backward()
    return loss.detach()
