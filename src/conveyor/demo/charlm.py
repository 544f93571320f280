"""A character-level GPT-style language model, built to be cut into pipeline stages.

``char_transformer`` returns a flat ``nn.Sequential``: an :class:`Embedding`, ``depth``
:class:`Block` modules and a :class:`Head`. Every child takes one tensor and returns one
tensor, so the model can be split between any two children.

Each module owns its parameters directly (no parameter-holding submodules) and
``reset_parameters()`` initialises exactly those. A model built under
``with torch.device("meta"):`` is therefore materialised by ``model.to_empty(device=...)``
followed by ``reset_parameters()`` on every module that has it; done in ``model.modules()``
order after the same ``torch.manual_seed``, this reproduces the eagerly built weights.
"""

from __future__ import annotations

from importlib import resources
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Block",
    "CharDataset",
    "Embedding",
    "Head",
    "char_transformer",
    "generate",
    "lm_loss",
    "load_text",
]

INIT_STD = 0.02
"""Standard deviation of the normal initialisation of every weight matrix and embedding."""


def load_text() -> str:
    """Return the packaged Shakespeare corpus (``conveyor/demo/data/shakespeare.txt``)."""
    data = resources.files("conveyor.demo").joinpath("data").joinpath("shakespeare.txt")
    return data.read_text(encoding="utf-8")


class CharDataset:
    """Character-level tokens of a text, with a deterministic train/validation split.

    The vocabulary is built from the whole text, so the ``"train"`` and ``"val"`` datasets of
    the same text share it. The first ``1 - val_fraction`` of the characters are the training
    split and the rest the validation split.
    """

    def __init__(self, text: str, split: Literal["train", "val"] = "train", *, val_fraction: float = 0.1) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if not text:
            raise ValueError("text is empty")
        self.split = split
        self.vocab: list[str] = sorted(set(text))
        self._index = {ch: i for i, ch in enumerate(self.vocab)}
        tokens = self.encode(text)
        n_train = int(len(tokens) * (1.0 - val_fraction))
        self.tokens: Tensor = tokens[:n_train] if split == "train" else tokens[n_train:]

    @property
    def vocab_size(self) -> int:
        """Number of distinct characters."""
        return len(self.vocab)

    def __len__(self) -> int:
        """Number of tokens in this split."""
        return len(self.tokens)

    def encode(self, text: str) -> Tensor:
        """Map ``text`` to a 1-D ``torch.long`` tensor of character ids."""
        try:
            ids = [self._index[ch] for ch in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary") from None
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: Tensor) -> str:
        """Map a 1-D tensor of character ids back to text."""
        return "".join(self.vocab[i] for i in ids.reshape(-1).tolist())

    def batch(self, batch_size: int, seq_len: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Sample ``batch_size`` random windows of ``seq_len`` characters from this split.

        Returns ``(inputs, targets)``, both contiguous ``(batch_size, seq_len)`` long tensors,
        where ``targets[:, t] == inputs[:, t + 1]``: each target is the next character.
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if seq_len >= len(self.tokens):
            raise ValueError(f"seq_len {seq_len} needs more than the {len(self.tokens)} tokens of the split")
        starts = torch.randint(0, len(self.tokens) - seq_len, (batch_size,), generator=generator)
        index = starts[:, None] + torch.arange(seq_len)
        return self.tokens[index], self.tokens[index + 1]


def _normal_(param: Tensor) -> None:
    nn.init.normal_(param, mean=0.0, std=INIT_STD)


def _empty(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


class Embedding(nn.Module):
    """Token embedding plus learned position embedding: ``(B, T)`` ids to ``(B, T, width)``."""

    def __init__(self, vocab_size: int, width: int, seq_len: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.vocab_size, self.width, self.seq_len, self.dropout = vocab_size, width, seq_len, dropout
        self.token_weight = _empty(vocab_size, width)
        self.position_weight = _empty(seq_len, width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw both embedding tables from ``normal(0, INIT_STD)``."""
        _normal_(self.token_weight)
        _normal_(self.position_weight)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[-1]
        if length > self.seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than seq_len={self.seq_len}")
        positions = torch.arange(length, device=ids.device)
        x = F.embedding(ids, self.token_weight) + F.embedding(positions, self.position_weight)
        return F.dropout(x, self.dropout, self.training)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, width={self.width}, seq_len={self.seq_len}, dropout={self.dropout}"


class Block(nn.Module):
    """Pre-LayerNorm transformer block: causal self-attention then a 4x GELU MLP, both residual."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.dropout = width, heads, dropout
        self.ln1_weight, self.ln1_bias = _empty(width), _empty(width)
        self.qkv_weight, self.qkv_bias = _empty(3 * width, width), _empty(3 * width)
        self.proj_weight, self.proj_bias = _empty(width, width), _empty(width)
        self.ln2_weight, self.ln2_bias = _empty(width), _empty(width)
        self.fc_weight, self.fc_bias = _empty(4 * width, width), _empty(4 * width)
        self.out_weight, self.out_bias = _empty(width, 4 * width), _empty(width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorms to identity, weight matrices from ``normal(0, INIT_STD)``, biases to zero."""
        for weight in (self.ln1_weight, self.ln2_weight):
            nn.init.ones_(weight)
        for weight in (self.qkv_weight, self.proj_weight, self.fc_weight, self.out_weight):
            _normal_(weight)
        for bias in (self.ln1_bias, self.ln2_bias, self.qkv_bias, self.proj_bias, self.fc_bias, self.out_bias):
            nn.init.zeros_(bias)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        p = self.dropout if self.training else 0.0
        h = F.layer_norm(x, (width,), self.ln1_weight, self.ln1_bias)
        q, k, v = F.linear(h, self.qkv_weight, self.qkv_bias).split(width, dim=-1)
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2) for t in (q, k, v))
        h = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        h = h.transpose(1, 2).reshape(batch, length, width)
        x = x + F.dropout(F.linear(h, self.proj_weight, self.proj_bias), p, self.training)
        h = F.layer_norm(x, (width,), self.ln2_weight, self.ln2_bias)
        h = F.gelu(F.linear(h, self.fc_weight, self.fc_bias))
        return x + F.dropout(F.linear(h, self.out_weight, self.out_bias), p, self.training)

    def extra_repr(self) -> str:
        return f"width={self.width}, heads={self.heads}, dropout={self.dropout}"


class Head(nn.Module):
    """Final LayerNorm and projection to vocabulary logits: ``(B, T, width)`` to ``(B, T, vocab)``."""

    def __init__(self, width: int, vocab_size: int) -> None:
        super().__init__()
        self.width, self.vocab_size = width, vocab_size
        self.ln_weight, self.ln_bias = _empty(width), _empty(width)
        self.weight, self.bias = _empty(vocab_size, width), _empty(vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LayerNorm to identity, projection from ``normal(0, INIT_STD)``, biases to zero."""
        nn.init.ones_(self.ln_weight)
        nn.init.zeros_(self.ln_bias)
        _normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, (self.width,), self.ln_weight, self.ln_bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"width={self.width}, vocab_size={self.vocab_size}"


def char_transformer(
    vocab_size: int,
    *,
    width: int = 128,
    depth: int = 4,
    heads: int = 4,
    seq_len: int = 64,
    dropout: float = 0.0,
) -> nn.Sequential:
    """Build the model as ``Sequential(Embedding, Block * depth, Head)``.

    Input: ``(B, T)`` long ids with ``T <= seq_len``; output: ``(B, T, vocab_size)`` logits.
    Weights come from the global RNG: call ``torch.manual_seed`` first for a reproducible model.
    """
    if min(vocab_size, width, depth, heads, seq_len) < 1:
        raise ValueError("vocab_size, width, depth, heads and seq_len must be positive")
    return nn.Sequential(
        Embedding(vocab_size, width, seq_len, dropout),
        *(Block(width, heads, dropout) for _ in range(depth)),
        Head(width, vocab_size),
    )


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross entropy of ``(B, T, vocab)`` logits against ``(B, T)`` next-character ids."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def generate(
    model: nn.Module,
    dataset: CharDataset,
    prompt: str,
    n_chars: int,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> str:
    """Sample ``n_chars`` characters after ``prompt`` from an unsplit model; return prompt + sample.

    The context is cropped to the model's ``seq_len``. ``temperature=0`` picks the most likely
    character at each step. The model is run in eval mode and its training flag restored after.
    """
    if not prompt:
        raise ValueError("prompt must contain at least one character")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    embedding = next((m for m in model.modules() if isinstance(m, Embedding)), None)
    if embedding is None:
        raise ValueError("model has no conveyor.demo.charlm.Embedding module")
    ids = dataset.encode(prompt).to(embedding.token_weight.device)[None]
    was_training = model.training
    model.eval()
    try:
        for _ in range(n_chars):
            logits = model(ids[:, -embedding.seq_len :])[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(ids.device)
            ids = torch.cat([ids, nxt], dim=1)
    finally:
        model.train(was_training)
    return dataset.decode(ids[0])
