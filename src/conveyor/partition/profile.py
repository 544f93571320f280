"""Profiled cost of consecutive layers: forward + backward seconds of each (torchgpipe's
``balance_by_time``), for ``balance="time"``."""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = ["profile_times"]


def _leaves(value: Any) -> Any:
    """Detached copies of the tensors of ``value`` that require grad where the originals may."""
    def leaf(item: Any) -> Any:
        if not isinstance(item, torch.Tensor):
            return item
        detached = item.detach()
        return detached.requires_grad_(item.requires_grad) if item.is_floating_point() else detached
    return pytree.tree_map(leaf, value)


def _sync(devices: set[torch.device]) -> None:
    for device in devices:
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def profile_times(units: Sequence[nn.Module], example_args: tuple, example_kwargs: dict | None = None, *,
                  runs: int = 3) -> list[float]:
    """Median forward + backward seconds of each unit over ``runs`` runs (after one warm-up).

    Unit 0 is called as ``unit(*example_args, **example_kwargs)``, every later unit with the
    previous unit's output, as pipeline stages are. Gradients, buffers (e.g. batch-norm
    statistics) and the random state are restored afterwards, so profiling changes nothing.
    """
    parameters = list({id(p): p for unit in units for p in unit.parameters()}.values())
    buffers = list({id(b): b for unit in units for b in unit.buffers()}.values())
    devices = {t.device for t in parameters + buffers}
    if any(device.type == "meta" for device in devices):
        raise ValueError("cannot time a model on the meta device: its weights have no storage; use "
                         "balance='params', or build the model on a real device to profile it")
    grads = [p.grad for p in parameters]
    saved = [b.detach().clone() for b in buffers]
    samples: list[list[float]] = [[] for _ in units]
    cuda = [d for d in devices if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=cuda):
            for run in range(runs + 1):
                value: Any = None
                for index, unit in enumerate(units):
                    args, kwargs = (example_args, example_kwargs or {}) if index == 0 else ((value,), {})
                    args, kwargs = _leaves((tuple(args), dict(kwargs)))
                    _sync(devices)
                    start = time.perf_counter()
                    output = unit(*args, **kwargs)
                    tensors = [t for t in pytree.tree_leaves(output)
                               if isinstance(t, torch.Tensor) and t.requires_grad]
                    if tensors:
                        torch.autograd.backward(tensors, [torch.ones_like(t) for t in tensors])
                    _sync(devices)
                    if run > 0:
                        samples[index].append(time.perf_counter() - start)
                    value = _leaves(output)
    finally:
        for parameter, grad in zip(parameters, grads):
            parameter.grad = grad
        with torch.no_grad():
            for buffer, copy in zip(buffers, saved):
                buffer.copy_(copy)
    return [statistics.median(times) for times in samples]
