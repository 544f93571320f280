"""``conveyor.profile``: what each cuttable block of a model costs, saved as JSON.

Per block (see :mod:`.units`) it measures the forward, the full backward, and the backward's two
halves as the zero-bubble runtime runs them (``I``: ``autograd.grad`` w.r.t. the block's input
with the graph kept; ``W``: then w.r.t. its parameters), the parameter bytes, the bytes autograd
saves for the backward (activation memory) and the bytes of the block's output (what crosses a
boundary cut after it). Times are measured at two micro-batch sizes and stored as
``fixed + per_row * rows``, so the planner can price any micro-batch size.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

from ..partition.pipe import is_meta
from ..partition.profile import MAX_RUNS, measure_blocks, tensors_of
from .units import cuttable_units

__all__ = ["MIN_SECONDS", "BlockProfile", "Cost", "Link", "Profile", "oversubscribed", "profile", "profile_together"]

# Timed runs continue until they took this long (``runs`` at least, ``MAX_RUNS`` at most): with 3
# runs, medians of a small model's blocks moved by 20-60% between identical profiles on the 2-core
# VM (docs/planning.md); over half a second they agree within a few percent.
MIN_SECONDS = 0.5
PROFILED_SIZES = 4  # the example's rows, a half, a quarter and an eighth of them


class Cost(NamedTuple):
    """Seconds for a micro-batch of ``rows`` rows. ``points``: the ``(rows, seconds)`` measured,
    by rows; between two of them the line through the two, elsewhere (or without points) the line
    ``fixed_s + per_row_s * rows`` through the smallest and the largest. Per-row costs are not one
    line: a micro-batch whose activations fit the caches runs faster per row (docs/planning.md)."""

    fixed_s: float
    per_row_s: float
    points: tuple[tuple[float, float], ...] = ()

    def at(self, rows: float) -> float:
        points = self.points
        if len(points) > 2 and points[0][0] <= rows <= points[-1][0]:
            for (rows_before, before), (rows_after, after) in zip(points, points[1:]):
                if rows <= rows_after:
                    return before + (after - before) * (rows - rows_before) / (rows_after - rows_before)
        return self.fixed_s + self.per_row_s * rows

    @staticmethod
    def from_list(values: Sequence[Any]) -> Cost:
        """The cost JSON stores as ``[fixed_s, per_row_s, [[rows, seconds], ...]]`` (points optional)."""
        points = tuple((float(rows), float(seconds)) for rows, seconds in values[2]) if len(values) > 2 else ()
        return Cost(float(values[0]), float(values[1]), points)


@dataclass
class BlockProfile:
    """One cuttable block's costs (times as :class:`Cost`, memory in bytes)."""

    name: str
    forward: Cost
    backward: Cost      # input and weight gradients in one pass (B)
    input_grad: Cost    # the input-gradient half of a split backward (I)
    weight_grad: Cost   # the weight-gradient half (W), after I
    param_bytes: int
    activation_bytes_per_row: float  # saved for the backward, per row of the micro-batch
    output_bytes_per_row: float      # sent to the next stage if a cut follows this block
    update_s: float = 0.0            # one optimizer step over the block's parameters (the workload's optimizer)
    stash_s: float = 0.0             # one copy of its parameters (a weight version of asynchronous schedules)

    @staticmethod
    def simple(name: str, forward_s: float, backward_s: float, *, param_bytes: int = 0,
               activation_bytes: float = 0.0, output_bytes: float = 0.0) -> BlockProfile:
        """A block whose costs are per row, with no fixed part; the backward split evenly into I and W."""
        return BlockProfile(name, Cost(0.0, forward_s), Cost(0.0, backward_s), Cost(0.0, backward_s / 2),
                            Cost(0.0, backward_s / 2), param_bytes, activation_bytes, output_bytes)


@dataclass
class Link:
    """A point-to-point link: a message of ``n`` bytes takes ``latency_s + n / bandwidth_bytes_s``."""

    latency_s: float = 50e-6
    bandwidth_bytes_s: float = 1e9
    source: str = "given"

    def time(self, n_bytes: float) -> float:
        return self.latency_s + n_bytes / self.bandwidth_bytes_s


@dataclass
class Profile:
    """A model's per-block costs, the link between ranks, and where they were measured."""

    blocks: list[BlockProfile]
    link: Link = field(default_factory=Link)
    rows: tuple[int, ...] = ()  # micro-batch sizes the times were measured at
    threads: int = 1            # torch threads of the process that measured them
    cores: int = 0              # CPU cores of the machine (0: unknown, no contention modelled)
    units: str = ""
    model: str = ""
    concurrent: int = 1         # processes that were profiling at once (contention included in the times)
    action_overhead_s: float = 0.0  # the runtime's own cost per action and hand-off (message latency included)
    tied_blocks: list[list[int]] = field(default_factory=list)  # per weight held by several blocks: those blocks
    stretch: float = 0.0        # wall over CPU seconds of the measuring process(es) (0: not recorded)
    clock: str = "wall"         # "cpu": timed in thread CPU seconds (single-threaded, cores shared)
    in_stream: dict[str, float] = field(default_factory=dict)  # F, B, U: in a pipeline / profiled; S (calibrate.py)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @staticmethod
    def from_json(text: str) -> Profile:
        data = json.loads(text)
        blocks = [BlockProfile(b["name"], *(Cost.from_list(b[k]) for k in ("forward", "backward", "input_grad",
                                                                             "weight_grad")),
                               b["param_bytes"], b["activation_bytes_per_row"], b["output_bytes_per_row"],
                               b.get("update_s", 0.0), b.get("stash_s", 0.0))
                  for b in data.pop("blocks")]
        link = Link(**data.pop("link"))
        return Profile(blocks, link, rows=tuple(data.pop("rows")), **data)

    def save(self, path: str | os.PathLike) -> Path:
        Path(path).write_text(self.to_json())
        return Path(path)

    @staticmethod
    def load(path: str | os.PathLike) -> Profile:
        return Profile.from_json(Path(path).read_text())


# --- measuring (partition/profile.py: the profiler the splitter's balance="time" uses too) ---------
def _rows(value: Any, rows: int) -> Any:
    return pytree.tree_map(lambda t: t[:rows] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, value)


def _fit(measured: Sequence[tuple[int, float]]) -> Cost:
    """The cost through ``(rows, seconds)`` measurements (by rows): the points, and the line through
    the smallest and the largest, kept non-negative (noise can tilt it)."""
    points = tuple((float(rows), seconds) for rows, seconds in measured)
    (rows_small, small), (rows_large, large) = points[0], points[-1]
    if rows_large == rows_small:
        return Cost(0.0, large / rows_large, points)
    per_row = (large - small) / (rows_large - rows_small)
    fixed = large - per_row * rows_large
    if per_row < 0 or fixed < 0:
        return Cost(0.0, large / rows_large, points)
    return Cost(fixed, per_row, points)


def _profile_rank(rank: int, world_size: int, model: Any, args: tuple, kwargs: dict, target: Any,
                  loss_fn: Any, runs: int, threads: int | None, optimizer: Any, min_seconds: float) -> Profile:
    return profile(model, args, kwargs, target=target, loss_fn=loss_fn, runs=runs, threads=threads, link=None,
                   optimizer=optimizer, min_seconds=min_seconds, cpu_time=oversubscribed(world_size, threads))


def oversubscribed(processes: int, threads: int | None) -> bool:
    """Whether ``processes`` single-threaded processes outnumber the cores: then a profile times
    their actions in CPU seconds (see ``costs.sharing_factor``); with a core each, in wall seconds."""
    return threads == 1 and processes > (os.cpu_count() or 1)


def _devices(modules: Sequence[nn.Module]) -> set[torch.device]:
    return {t.device for m in modules for t in [*m.parameters(), *m.buffers()]}


def _adamw(parameters: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(parameters, lr=1e-3)


def measure_updates(modules: Sequence[nn.Module], optimizer: Callable[[Any], torch.optim.Optimizer],
                    runs: int, min_seconds: float = 0.0, cpu_time: bool = False) -> list[tuple[float, float]]:
    """Per block, the median seconds of one ``optimizer`` step over its parameters (after a first
    step that creates the optimizer's state) and of one copy of them (a weight version), taken on
    copies: the model's parameters, gradients and state stay as they were. ``min_seconds``: per
    block, keep timing (up to ``MAX_RUNS``) until its steps took that long. ``cpu_time``: in the
    thread's CPU seconds (CPU parameters, one thread) instead of wall seconds."""
    results = []
    for module in modules:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            results.append((0.0, 0.0))
            continue
        copies = [nn.Parameter(p.detach().clone()) for p in params]
        now = time.thread_time if cpu_time and all(p.device.type == "cpu" for p in params) else time.perf_counter
        step = optimizer(copies)
        update, stash = [], []
        started, run = time.perf_counter(), 0
        while run <= runs or (run < MAX_RUNS and time.perf_counter() - started < min_seconds):
            run += 1
            for copy in copies:
                copy.grad = torch.ones_like(copy)
            start = now()
            step.step()
            middle = now()
            versions = [copy.detach().clone() for copy in copies]
            end = now()
            step.zero_grad(set_to_none=True)
            del versions
            if run > 1:  # the first step creates the optimizer's state
                update.append(middle - start)
                stash.append(end - middle)
        results.append((statistics.median(update), statistics.median(stash)))
    return results


def _median_profile(profiles: Sequence[Profile]) -> Profile:
    """Field by field, the median over profiles of the same model."""
    def median_cost(costs: Sequence[Cost]) -> Cost:
        rows = [tuple(r for r, _ in c.points) for c in costs]
        points = tuple((r, statistics.median(c.points[i][1] for c in costs)) for i, r in enumerate(rows[0])) \
            if len(set(rows)) == 1 else ()
        return Cost(statistics.median(c.fixed_s for c in costs), statistics.median(c.per_row_s for c in costs),
                    points)
    blocks = []
    for same in zip(*(p.blocks for p in profiles)):
        first = same[0]
        blocks.append(BlockProfile(first.name, *(median_cost([getattr(b, k) for b in same])
                                                 for k in ("forward", "backward", "input_grad", "weight_grad")),
                                   first.param_bytes, first.activation_bytes_per_row, first.output_bytes_per_row,
                                   statistics.median(b.update_s for b in same),
                                   statistics.median(b.stash_s for b in same)))
    head = profiles[0]
    return Profile(blocks, head.link, head.rows, head.threads, head.cores, head.units, head.model, len(profiles),
                   head.action_overhead_s, head.tied_blocks, statistics.median(p.stretch for p in profiles),
                   head.clock)


def profile_together(rank_fn: Callable[..., Profile], args: tuple, concurrent: int, *, threads: int | None,
                     link: Link | str | None = "measure", name: str = "", timeout: float = 600.0) -> Profile:
    """``concurrent`` local processes each return ``rank_fn(rank, world_size, *args)`` (a profile
    taken with ``link=None``) at once; the median of their times is kept and the link (and the
    runtime's overhead per action) measured as ``concurrent`` ranks would see it. ``rank_fn``
    and ``args`` must unpickle in a fresh process: to profile a user's script, send its
    :class:`~conveyor.workloads.WorkloadSpec` and build the model in ``rank_fn`` (``cli_plan.py``)."""
    from ..launch import launch
    from .link import measure_action_overhead, measure_link

    merged = _median_profile(launch(rank_fn, concurrent, timeout=timeout, threads_per_rank=threads, args=args))
    merged.link = measure_link(processes=concurrent) if link == "measure" else \
        link if isinstance(link, Link) else Link()
    if link == "measure":
        merged.action_overhead_s = measure_action_overhead(concurrent)
    merged.model = name or merged.model
    return merged


def profile(model: nn.Module | Sequence[nn.Module], example_args: Any, example_kwargs: dict | None = None, *,
            target: Any = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, runs: int = 3,
            threads: int | None = None, link: Link | str | None = "measure", name: str = "",
            concurrent: int = 1, timeout: float = 600.0,
            optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
            min_seconds: float = MIN_SECONDS, cpu_time: bool = False) -> Profile:
    """Measure ``model``'s cuttable blocks on ``example_args`` (one micro-batch) and the link.

    ``target`` and ``loss_fn`` add the loss to the last block, as the last stage runs it.
    ``threads`` sets ``torch.set_num_threads`` while timing (use what each rank will get, e.g.
    ``cores // ranks``). ``link``: ``"measure"`` (a gloo ping-pong between two local
    processes), a :class:`Link` (for a cluster), or None (the default :class:`Link`). The batch is
    timed at its size, a half, a quarter and an eighth of it (:class:`Cost` interpolates between
    them and separates fixed from per-row costs). Gradients, buffers and the random state are
    left as they were.

    With ``link="measure"`` the runtime's overhead per action is measured too (an empty 1F1B
    pipeline on ``max(2, concurrent)`` ranks). ``concurrent=n`` profiles in ``n`` local processes
    at once (the model and ``loss_fn`` are pickled to them) and keeps the median: the times then
    include whatever else loads the machine; the planner divides out the ``n`` processes' own
    sharing of the cores (``costs.sharing_factor``) and models it where ranks really overlap.
    ``optimizer(parameters)`` (default AdamW) is timed on copies of each block's parameters: the
    update every step (and every asynchronous update) pays. Each size is timed over ``runs`` runs
    at least and until the runs took ``min_seconds`` (at most ``MAX_RUNS``): a small model's
    medians need that many to hold still.
    """
    from .link import measure_action_overhead, measure_link

    if concurrent > 1:
        return profile_together(_profile_rank,
                                (model, example_args, example_kwargs, target, loss_fn, runs, threads, optimizer,
                                 min_seconds),
                                concurrent, threads=threads, link=link, name=name, timeout=timeout)

    args = example_args if isinstance(example_args, tuple) else (example_args,)
    kwargs = dict(example_kwargs or {})
    units = cuttable_units(model, args, kwargs)
    rows_large = next((t.shape[0] for t in tensors_of((args, kwargs)) if t.dim() > 0), 1)
    sizes = sorted({max(1, rows_large >> halvings) for halvings in range(PROFILED_SIZES)})
    if any(is_meta(m) for m in units.modules):
        raise ValueError("cannot profile a model on the meta device: build it on a real device")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        with torch.random.fork_rng():
            measured = {rows: measure_blocks(units.modules, _rows(args, rows), _rows(kwargs, rows),
                                             target=_rows(target, rows), loss_fn=loss_fn, runs=runs,
                                             min_seconds=min_seconds, cpu_time=cpu_time)
                        for rows in reversed(sizes)}
            updates = measure_updates(units.modules, optimizer or _adamw, runs,
                                      min_seconds=min_seconds / max(1, len(units.modules)), cpu_time=cpu_time)
    finally:
        torch.set_num_threads(old_threads)
    stretch = (time.perf_counter() - wall) / max(1e-9, time.process_time() - cpu)
    large = measured[rows_large]
    blocks = []
    for index, (unit_name, module, big, (update_s, stash_s)) in enumerate(zip(units.names, units.modules, large,
                                                                                updates)):
        costs = [_fit([(rows, measured[rows][index][k]) for rows in sizes]) for k in "FBIW"]
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        blocks.append(BlockProfile(unit_name, *costs, param_bytes, big["saved"] / rows_large,
                                   big["output"] / rows_large, update_s, stash_s))
    overhead = 0.0
    if link == "measure":
        link = measure_link()
        overhead = measure_action_overhead(2)
    elif link is None:
        link = Link()
    elif not isinstance(link, Link):
        raise ValueError(f"link={link!r}: pass 'measure', a conveyor.planning.Link or None")
    holders: dict[int, list[int]] = {}
    for index, module in enumerate(units.modules):
        for parameter in module.parameters():
            holders.setdefault(id(parameter), []).append(index)
    tied = [blocks for blocks in holders.values() if len(blocks) > 1]
    return Profile(blocks, link, rows=tuple(sizes), threads=threads or old_threads,
                   cores=os.cpu_count() or 1, units=units.kind, model=name or type(model).__name__,
                   action_overhead_s=overhead, tied_blocks=tied, stretch=stretch,
                   clock="cpu" if cpu_time and not any(d.type == "cuda" for d in _devices(units.modules)) else "wall")
