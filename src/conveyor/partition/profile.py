"""The one profiler: what each of a chain of blocks costs when run as pipeline stages.

Block 0 runs on the example inputs, every later block on the previous block's output, detached
into a fresh input as a stage receives it (``runtime.bundle.detached_leaves``). Per block it
measures the forward, the full backward (``B``), the backward's two halves as the zero-bubble
runtime runs them (``I``: ``autograd.grad`` w.r.t. the block's input with the graph kept; ``W``:
then w.r.t. its parameters), the bytes autograd saves for the backward and the bytes of the
block's output. ``balance="time"`` (the splitter) uses the forward + backward times through
:func:`profile_times`; ``conveyor.profile`` (the planner, ``planning/profile.py``) uses all of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from .pipe import is_meta

__all__ = ["MAX_RUNS", "measure_blocks", "profile_times", "stage_input", "tensors_of"]

MAX_RUNS = 50  # timed runs at most when ``min_seconds`` asks for more than ``runs``

Loss = Callable[[Any, Any], torch.Tensor]


def tensors_of(value: Any) -> list[torch.Tensor]:
    """The tensors of a (nested) value, in pytree order."""
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def stage_input(value: Any) -> Any:
    """``value`` as the next stage receives it: the runtime's own detach helper."""
    from ..runtime.bundle import detached_leaves  # a leaf module (torch only); runtime imports partition

    return detached_leaves(value, "profiled block input")[0]


class _Saved:
    """Counts the bytes autograd saves for the backward (each storage once, parameters excluded)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude, self.seen, self.bytes = exclude, set(), 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.exclude and key not in self.seen and storage.nbytes() > 0:
            self.seen.add(key)
            self.bytes += storage.nbytes()
        return tensor


class _Clock:
    """Wall-clock seconds, with the CUDA devices in use synchronised at both ends; or, with
    ``cpu_time``, the calling thread's CPU seconds (for single-threaded CPU work, what it costs
    however the cores are shared)."""

    def __init__(self, devices: set[torch.device], cpu_time: bool = False) -> None:
        self.cuda = [d for d in devices if d.type == "cuda"]
        self.now = time.thread_time if cpu_time and not self.cuda else time.perf_counter

    def sync(self) -> None:
        for device in self.cuda:
            torch.cuda.synchronize(device)

    def timed(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, Any]:
        self.sync()
        start = self.now()
        result = fn(*args, **kwargs)
        self.sync()
        return self.now() - start, result


def _grad(outputs: list[torch.Tensor], grads: list[torch.Tensor], wrt: list[torch.Tensor], *, retain: bool) -> None:
    torch.autograd.grad(outputs, wrt, grads, retain_graph=retain, allow_unused=True)


def measure_blocks(modules: Sequence[nn.Module], args: tuple, kwargs: dict | None = None, *, target: Any = None,
                   loss_fn: Loss | None = None, runs: int = 3, split_backward: bool = True,
                   min_seconds: float = 0.0, cpu_time: bool = False) -> list[dict[str, float]]:
    """Per block, the median seconds ``F``, ``B``, ``I``, ``W`` over ``runs`` runs (after one
    warm-up) and the bytes ``saved`` (for the backward) and ``output`` (0 for the last block).
    ``min_seconds``: keep running (up to ``MAX_RUNS``) until the runs took that long, so that
    small models are timed over enough repeats to steady their medians. ``cpu_time``: time
    CPU-only blocks in the thread's CPU seconds instead of wall seconds (see ``_Clock``).

    ``target`` and ``loss_fn`` add the loss to the last block, as the last stage runs it. With
    ``split_backward=False`` only ``F`` and ``B`` are measured (``I`` and ``W`` are 0). Gradients
    are taken with ``autograd.grad``, so no ``.grad`` changes; buffers (batch-norm statistics)
    and the random state are restored afterwards.
    """
    kwargs = dict(kwargs or {})
    parameters = list({id(p): p for m in modules for p in m.parameters()}.values())
    buffers = list({id(b): b for m in modules for b in m.buffers()}.values())
    devices = {t.device for t in parameters + buffers}
    devices |= {t.device for t in tensors_of((args, kwargs))}
    clock = _Clock(devices, cpu_time)
    saved_buffers = [b.detach().clone() for b in buffers]
    samples: list[dict[str, list[float]]] = [{k: [] for k in "FBIW"} for _ in modules]
    memory: list[dict[str, float]] = [{} for _ in modules]
    try:
        with torch.random.fork_rng(devices=clock.cuda):
            started, run = time.perf_counter(), 0
            while run <= runs or (run < MAX_RUNS and time.perf_counter() - started < min_seconds):
                run += 1
                value: Any = None
                for index, module in enumerate(modules):
                    last = index == len(modules) - 1
                    inputs = stage_input((tuple(args), kwargs) if index == 0 else ((value,), {}))
                    leaves = [t for t in tensors_of(inputs) if t.requires_grad]
                    params = [p for p in module.parameters() if p.requires_grad]

                    def forward(inputs: Any = inputs, module: nn.Module = module, last: bool = last) -> Any:
                        output = module(*inputs[0], **inputs[1])
                        if last and loss_fn is not None:
                            return output, [loss_fn(output, target)]
                        return output, [t for t in tensors_of(output) if t.requires_grad]

                    saved = _Saved({p.untyped_storage().data_ptr() for p in module.parameters()})
                    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
                        forward_s, (output, outs) = clock.timed(forward)
                    grads = [torch.ones_like(t) for t in outs]
                    input_s = weight_s = 0.0
                    if split_backward:
                        if outs and leaves:
                            input_s, _ = clock.timed(_grad, outs, grads, leaves, retain=True)
                        if outs and params:
                            weight_s, _ = clock.timed(_grad, outs, grads, params, retain=False)
                        _, (_, outs) = clock.timed(forward)  # the graph was consumed: a fresh one for B
                    backward_s = 0.0
                    if outs and (leaves or params):
                        backward_s, _ = clock.timed(_grad, outs, grads, leaves + params, retain=False)
                    if run > 1:  # the first run warms up
                        for key, seconds in zip("FBIW", (forward_s, backward_s, input_s, weight_s)):
                            samples[index][key].append(seconds)
                    memory[index] = {"saved": float(saved.bytes),
                                     "output": 0.0 if last else float(sum(t.nbytes for t in tensors_of(output)))}
                    value = output
    finally:
        with torch.no_grad():
            for buffer, copy in zip(buffers, saved_buffers):
                buffer.copy_(copy)
    return [{**{k: statistics.median(v) for k, v in s.items()}, **m} for s, m in zip(samples, memory)]


def profile_times(units: Sequence[nn.Module], example_args: tuple, example_kwargs: dict | None = None, *,
                  runs: int = 3) -> list[float]:
    """Median forward + backward seconds of each unit over ``runs`` runs (after one warm-up), for
    ``balance="time"``: :func:`measure_blocks` without the split backward. Profiling changes no
    gradient, buffer or random state."""
    if any(is_meta(unit) for unit in units):
        raise ValueError("cannot time a model on the meta device: its weights have no storage; use "
                         "balance='params', or build the model on a real device to profile it")
    measured = measure_blocks(units, tuple(example_args), example_kwargs, runs=runs, split_backward=False)
    return [block["F"] + block["B"] for block in measured]
