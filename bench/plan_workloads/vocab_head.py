"""A heavy last stage: an embedding, four residual MLP blocks of width 128 and a 16384-token
vocabulary head (as a language model's), batch 16 x 32 tokens, cross entropy."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

BATCH_SIZE = 16
VOCAB, WIDTH, SEQ = 16384, 128, 32


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up = nn.Linear(WIDTH, 4 * WIDTH)
        self.down = nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


def build_model() -> nn.Module:
    return nn.Sequential(nn.Embedding(VOCAB, WIDTH), *(Block() for _ in range(4)), nn.LayerNorm(WIDTH),
                         nn.Linear(WIDTH, VOCAB))


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, VOCAB, (batch_size, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output.reshape(-1, VOCAB), target.reshape(-1))
