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


class TiedLM(nn.Module):
    """Embedding whose weight is reused by the output projection (like GPT-2's wte/lm_head)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, WIDTH, dtype=DTYPE)
        self.mid = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)
        self.norm = nn.LayerNorm(WIDTH, dtype=DTYPE)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.embed(ids))))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.embed.weight.T


class _TiedHead(nn.Module):
    def __init__(self, model: TiedLM) -> None:
        super().__init__()
        self.embed, self.norm = model.embed, model.norm

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(hidden) @ self.embed.weight.T


class _Named(nn.Module):
    """Holds children under given names; calls them in order."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for child in self.children():
            x = child(x)
        return x


class _Tanh(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x)


def tied_pipe(model: TiedLM):  # noqa: ANN201 - returns conveyor.Pipe
    """Three stages: embed | mid | head reusing embed.weight; the tie recorded on the pipe."""
    from conveyor.partition.pipe import Pipe

    pipe = Pipe([_Named(embed=model.embed), _Named(mid=model.mid, act=_Tanh()), _TiedHead(model)])
    pipe.ties = {"embed.weight": [0, 2]}
    return pipe


def token_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())


class SkipEnter(nn.Module):
    """First stage of the skip model: returns (hidden, the input kept for a later stage)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.linear(x)), x


class SkipCarry(nn.Module):
    """A middle stage: transforms the hidden state, carries the skip value through untouched."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, value: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, skip = value
        return torch.tanh(self.linear(hidden)), skip


class SkipExit(nn.Module):
    """Last stage: adds the value that skipped the stages in between."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, value: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, skip = value
        return self.linear(hidden) + 2.0 * skip


def skip_model(n_stages: int, seed: int = 0) -> list[nn.Module]:
    """A residual from stage 0 used by the last stage, crossing every boundary in between."""
    torch.manual_seed(seed)
    return [SkipEnter(), *[SkipCarry() for _ in range(n_stages - 2)], SkipExit()]


def mlp32(seed: int = 0, width: int = 16) -> nn.Sequential:
    """A float32 MLP of 4 Linear + Tanh pairs, for mixed-precision tests (autocast skips float64)."""
    torch.manual_seed(seed)
    return nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(width, width), nn.Tanh())])


def batch32(rows: int = 32, width: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator)
