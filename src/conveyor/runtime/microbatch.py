"""Splitting a batch into micro-batches along dim 0, weighting their losses, merging outputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .bundle import flatten, unflatten

__all__ = ["batch_size", "split_batch", "split_value", "loss_weights", "merge"]


def batch_size(inputs: Sequence[Any], n_microbatches: int) -> int:
    """The batch size of ``inputs`` (dim 0 of the first tensor), checked against the micro-batch count."""
    tensors = [x for x in inputs if isinstance(x, torch.Tensor)]
    if not tensors:
        raise ValueError("step() needs at least one tensor input to split into micro-batches")
    if tensors[0].dim() == 0:
        raise ValueError("the first input is a scalar: inputs need a batch dimension (dim 0) to split")
    size = tensors[0].shape[0]
    for position, tensor in enumerate(tensors[1:], start=1):
        if tensor.dim() == 0 or tensor.shape[0] != size:
            raise ValueError(f"input {position} has batch size {tuple(tensor.shape)[:1] or 'none'} but input 0 "
                             f"has {size}: every input tensor must have the same dim 0")
    if size == 0:
        raise ValueError("the batch is empty (dim 0 is 0): pass at least one row per micro-batch")
    if size < n_microbatches:
        raise ValueError(f"a batch of {size} rows cannot be split into {n_microbatches} micro-batches: pass a "
                         f"batch of at least {n_microbatches} rows or use n_microbatches <= {size}")
    return size


def split_value(value: Any, size: int, n_microbatches: int) -> list[Any]:
    """Split every tensor of ``value`` whose dim 0 is ``size``; other values are repeated."""
    structure, tensors = flatten(value, "input")
    parts = [torch.tensor_split(t, n_microbatches) if t.dim() > 0 and t.shape[0] == size else None
             for t in tensors]
    return [unflatten(structure, [t if p is None else p[i] for t, p in zip(tensors, parts)])
            for i in range(n_microbatches)]


def split_batch(inputs: tuple, kwargs: dict, n_microbatches: int) -> list[tuple[tuple, dict]]:
    """``[(args, kwargs)]`` for each micro-batch."""
    positional = [x for x in inputs if isinstance(x, torch.Tensor)]
    keyword = [x for x in kwargs.values() if isinstance(x, torch.Tensor)]
    size = batch_size(inputs if positional else keyword[:1], n_microbatches)  # inputs given by name only
    args = split_value(tuple(inputs), size, n_microbatches)
    kwarg_parts = split_value(dict(kwargs), size, n_microbatches)
    return list(zip(args, kwarg_parts))


def loss_weights(targets: Sequence[Any], mode: str, ignore_index: int) -> list[float]:
    """Each micro-batch's share of the batch loss: by rows, or by counted tokens."""
    if mode == "rows":
        counts = [float(flatten(t, "target")[1][0].shape[0]) for t in targets]
    elif mode == "tokens":
        counts = [float(sum(int((x != ignore_index).sum()) for x in flatten(t, "target")[1])) for t in targets]
    else:
        raise ValueError(f"loss_weighting={mode!r} is not one of 'rows', 'tokens'")
    total = sum(counts)
    if total == 0:
        raise ValueError("no target token is counted (all equal ignore_index): the loss is undefined")
    return [count / total for count in counts]


def merge(outputs: Sequence[Any]) -> Any:
    """Concatenate micro-batch outputs along dim 0 (scalars are stacked)."""
    structure, _ = flatten(outputs[0], "output")
    columns = zip(*(flatten(output, "output")[1] for output in outputs))
    merged = [torch.cat(column) if column[0].dim() > 0 else torch.stack(column) for column in columns]
    return unflatten(structure, merged)
