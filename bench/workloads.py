"""The models and batches the benchmarks run, built identically on every rank (fixed seeds).

Each workload is a list of stage modules (what one pipeline stage runs) plus a batch and a loss
function; the single-process baseline runs the same modules one after another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sleep_stages import Record, SleepStage, SplitSleepStage

__all__ = ["Workload", "Scale", "Block", "sum_loss", "token_loss", "overhead_workload", "sleep_workload",
           "mlp_workload", "transformer_workload"]


@dataclass
class Workload:
    """Stage modules (in pipeline order), one batch, its target and the loss."""

    stages: list[nn.Module]
    inputs: torch.Tensor
    target: torch.Tensor
    loss_fn: Any


def sum_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum(output * target)``: a loss that costs nothing and keeps every element in the graph."""
    return (output * target).sum()


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross entropy over ``(batch, seq, vocab)`` logits and ``(batch, seq)`` token ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


class Scale(nn.Module):
    """``x * w`` with one scalar parameter: a stage that does (almost) nothing, differentiably."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def overhead_workload(n_stages: int, batch: int = 8, width: int = 4) -> Workload:
    """Stages that do no work on a tiny ``(batch, width)`` tensor: what is left is the runtime."""
    return Workload([Scale() for _ in range(n_stages)], torch.ones(batch, width), torch.ones(batch, width),
                    sum_loss)


def sleep_workload(n_stages: int, forward_s: float, backward_s: float, *, split: bool = False,
                   records: list[Record] | None = None, batch: int = 8, width: int = 4) -> Workload:
    """Sleeping stages; ``split=True`` gives separate I and W nodes of ``backward_s / 2`` each.
    Every sleep is appended to ``records`` (if given)."""
    stages: list[nn.Module]
    if split:
        stages = [SplitSleepStage(i, forward_s, backward_s / 2, backward_s / 2, records) for i in range(n_stages)]
    else:
        stages = [SleepStage(i, forward_s, backward_s, records) for i in range(n_stages)]
    return Workload(stages, torch.ones(batch, width), torch.ones(batch, width), sum_loss)


def mlp_workload(n_stages: int, *, layers: int = 8, width: int = 512, batch: int = 64) -> Workload:
    """``layers`` x (Linear(width, width) + ReLU), cut into ``n_stages`` equal stages."""
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(layers)]
    per = layers // n_stages
    stages: list[nn.Module] = [nn.Sequential(*blocks[i * per:(i + 1) * per]) for i in range(n_stages)]
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, width, generator=generator)
    target = torch.randn(batch, width, generator=generator)
    return Workload(stages, inputs, target, F.mse_loss)


class Block(nn.Module):
    """A GPT-2-style pre-norm decoder block (causal self-attention + 4x MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab: int, width: int, seq: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Parameter(torch.zeros(seq, width))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tokens(ids) + self.positions[: ids.shape[1]]


def transformer_workload(n_stages: int, *, layers: int = 4, width: int = 256, heads: int = 4, seq: int = 128,
                         vocab: int = 512, batch: int = 8) -> Workload:
    """A small GPT-2-style decoder (embedding, ``layers`` blocks, final norm and head), cut into
    ``n_stages`` stages of ``layers / n_stages`` blocks; the embedding goes with the first, the
    head with the last."""
    torch.manual_seed(0)
    blocks: list[nn.Module] = [Block(width, heads) for _ in range(layers)]
    per = layers // n_stages
    stages: list[nn.Module] = []
    for index in range(n_stages):
        parts: list[nn.Module] = blocks[index * per:(index + 1) * per]
        if index == 0:
            parts = [Embed(vocab, width, seq), *parts]
        if index == n_stages - 1:
            parts = [*parts, nn.LayerNorm(width), nn.Linear(width, vocab)]
        stages.append(nn.Sequential(*parts))
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=generator)
    return Workload(stages, ids[:, :-1].contiguous(), ids[:, 1:].contiguous(), token_loss)
