"""GPT-2 small for the GPU check: Hugging Face's GPT2LMHeadModel (GPT2Config defaults,
use_cache=False, random init) when transformers is installed, otherwise a built-in model of the
same architecture and size (pre-LayerNorm blocks, tanh GELU, learned positions, tied head;
124M parameters), so the check runs on a machine without transformers and without internet."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["GPT2Shape", "SMALL", "TINY", "build", "lm_loss", "have_transformers"]


class GPT2Shape:
    def __init__(self, n_layer: int, n_embd: int, n_head: int, vocab_size: int, n_positions: int) -> None:
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.vocab_size, self.n_positions = vocab_size, n_positions


SMALL = GPT2Shape(12, 768, 12, 50257, 1024)  # GPT2Config() defaults
TINY = GPT2Shape(2, 64, 4, 128, 64)           # for the CPU dry run


def have_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


class _Block(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.out = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attended.transpose(1, 2).reshape(batch, length, width))
        return x + self.out(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class _Embed(nn.Module):
    def __init__(self, shape: GPT2Shape, wte: nn.Embedding) -> None:
        super().__init__()
        self.wte, self.wpe = wte, nn.Embedding(shape.n_positions, shape.n_embd)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))


class _Head(nn.Module):
    def __init__(self, shape: GPT2Shape, wte: nn.Embedding) -> None:
        super().__init__()
        self.ln_f, self.wte = nn.LayerNorm(shape.n_embd), wte

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_f(x) @ self.wte.weight.T


def _builtin_layers(shape: GPT2Shape) -> list[nn.Module]:
    wte = nn.Embedding(shape.vocab_size, shape.n_embd)
    blocks = [_Block(shape.n_embd, shape.n_head) for _ in range(shape.n_layer)]
    return [_Embed(shape, wte), *blocks, _Head(shape, wte)]


def build(shape: GPT2Shape, n_stages: int | None, example: torch.Tensor, kind: str = "auto",
          seed: int = 0) -> tuple[Any, nn.Module]:
    """``(pipe, unsplit model)`` with the same weights (pipe None when ``n_stages`` is None).
    ``kind``: "transformers", "builtin" or "auto" (transformers when installed). The Hugging Face
    model is cut by tracing; the built-in one is an nn.Sequential cut into ``n_stages`` by
    parameter count (its embedding and head share one Parameter, but across processes that tie
    is not recorded, so their gradients are not exchanged: fine for timing, not for training)."""
    import conveyor

    torch.manual_seed(seed)
    if kind == "transformers" or (kind == "auto" and have_transformers()):
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging

        logging.set_verbosity_error()
        config = GPT2Config(n_layer=shape.n_layer, n_embd=shape.n_embd, n_head=shape.n_head,
                            vocab_size=shape.vocab_size, n_positions=shape.n_positions, use_cache=False)
        model: nn.Module = GPT2LMHeadModel(config)
        if n_stages is None:
            return None, model
        return conveyor.pipeline(model, n_stages=n_stages, example_args=(example,)), model
    model = nn.Sequential(*_builtin_layers(shape))
    return (conveyor.pipeline(model, n_stages=n_stages) if n_stages is not None else None), model


def lm_loss(output: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross entropy of logits (a tensor, or a Hugging Face output's ``.logits``) against labels."""
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
