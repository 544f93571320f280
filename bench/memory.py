"""Benchmark 5, activation memory: 4 stages on 4 processes, 8 micro-batches of 16 rows, each stage
4 x (Linear(1024, 1024) + GELU); peak activation bytes per stage for gpipe, gpipe with
re-materialisation, 1f1b and zb-h1, in both libraries, against each schedule's bound.

Two counters run in every rank during one step (after warm-up steps), the same for both libraries:

* **saved** (:class:`SavedBytes`): ``torch.autograd.graph.saved_tensors_hooks``. The pack hook
  adds the bytes of every tensor autograd saves for backward (counted once per distinct memory
  span, parameters excluded) and wraps it in a small object whose release (when autograd frees
  the saved variable, or the graph dies) subtracts them again. This is what "activation memory"
  means in the schedule's bound: the bound is ``simulate(...).peak_activations[s]`` (equal to
  ``runner.peak_stashed[s]``) micro-batches times one micro-batch's saved bytes, measured by the
  same hooks on a lone forward of that stage.
* **all tensors** (:class:`LiveTensors`): a ``TorchDispatchMode`` that sees every storage an aten
  op allocates during the step and a ``weakref.finalize`` on it that sees it freed: the peak of
  the live sum, above the step's starting level. This is the CPU analogue of CUDA's
  ``max_memory_allocated``: it also counts what autograd does not save (each stage's output held
  for the backward, received inputs, gradients in flight, message buffers, temporaries).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import conveyor
from conveyor.schedule import simulate
from conveyor.schedule.actions import BACKWARD, FORWARD, WEIGHT_GRAD, Action

from . import charts
from .harness import QUICK, Plan
from .report import Section, Table, ratio
from .torch_pipelining import torch_step
from .workloads import Workload, sum_loss

__all__ = ["CASES", "RANK_CASES", "SavedBytes", "LiveTensors", "memory_workload", "rank_bound", "rank_worker",
           "worker", "run"]

N_RANKS = 4
N_MICROBATCHES = 8
ROWS = 16  # per micro-batch
WIDTH = 1024
QUICK_WIDTH = 256  # --quick: a quarter of the width (a smoke test of the machinery)
LAYERS = 4  # Linear + GELU pairs per stage
MEASURED_STEPS = 2  # tracked steps after warm-up (the numbers must agree; the last is reported)

# case: (schedule, recompute)
CASES: dict[str, tuple[str, bool]] = {
    "gpipe": ("gpipe", False),
    "gpipe+recompute": ("gpipe", True),
    "1f1b": ("1f1b", False),
    "zb-h1": ("zb-h1", False),
}

# issue 19, per rank (conveyor only): schedule -> stages per rank; a V rank's two stages have half the
# layers each, so every rank holds the same LAYERS
RANK_CASES: dict[str, int] = {"1f1b": 1, "zb-h1": 1, "zb-h2": 1, "zb-v": 2, "v-min": 2, "v-half": 2, "dualpipev": 2}

MiB = 2 ** 20


# --- counters --------------------------------------------------------------------------------------
class _Packed:
    """What autograd holds instead of a saved tensor; releasing it releases the tensor's bytes."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor: torch.Tensor, key: tuple[int, int] | None, owner: SavedBytes) -> None:
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self) -> None:
        if self.key is not None:
            self.owner.release(self.key)


class SavedBytes:
    """Live bytes of the tensors autograd saved for backward, via ``saved_tensors_hooks``.

    A tensor counts ``numel * element_size`` bytes once per distinct span ``(data_ptr, bytes)``
    however many nodes save it (GELU saves the tensor the Linear before it produced, and the
    next Linear saves GELU's output); tensors in the storages of ``exclude`` (parameters) do not
    count. ``events`` gets ``(perf_counter, live bytes)`` at each change while ``recording``.
    """

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.spans: dict[tuple[int, int], list[int]] = {}  # span -> [references, bytes]
        self.current = 0
        self.peak = 0
        self.recording = False
        self.events: list[tuple[float, int]] = []

    def _pack(self, tensor: torch.Tensor) -> _Packed:
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0 or tensor.device.type == "meta" or tensor.untyped_storage().data_ptr() in self.exclude:
            return _Packed(tensor, None, self)
        key = (tensor.data_ptr(), nbytes)
        entry = self.spans.get(key)
        if entry is None:
            self.spans[key] = [1, nbytes]
            self._change(nbytes)
        else:
            entry[0] += 1
        return _Packed(tensor, key, self)

    @staticmethod
    def _unpack(packed: _Packed) -> torch.Tensor:
        return packed.tensor

    def release(self, key: tuple[int, int]) -> None:
        entry = self.spans[key]
        entry[0] -= 1
        if entry[0] == 0:
            del self.spans[key]
            self._change(-entry[1])

    def _change(self, delta: int) -> None:
        self.current += delta
        self.peak = max(self.peak, self.current)
        if self.recording:
            self.events.append((time.perf_counter(), self.current))

    def reset_peak(self) -> None:
        self.peak = self.current
        self.events = []

    @contextmanager
    def hooks(self) -> Iterator[SavedBytes]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield self


class LiveTensors(TorchDispatchMode):
    """Live bytes of every storage an aten op allocated while the mode was on: an op's output
    whose storage is none of its inputs' is new; ``weakref.finalize`` on that storage sees it
    freed (storages keep their Python object while C++ holds them)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, pointer: int, nbytes: int) -> None:
        if self.live.pop(pointer, None) is not None:
            self.current -= nbytes

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = None
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            pointer, nbytes = storage.data_ptr(), storage.nbytes()
            if not pointer or not nbytes or pointer in self.live:
                continue
            if inputs is None:
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                          if isinstance(t, torch.Tensor) and t.device.type == "cpu"}
            if pointer in inputs:
                continue
            self.live[pointer] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, pointer, nbytes)
        return out


# --- workload ---------------------------------------------------------------------------------------
def memory_workload(n_stages: int = N_RANKS, n_microbatches: int = N_MICROBATCHES, *, rows: int = ROWS,
                    width: int = WIDTH, layers: int = LAYERS, only: int | Collection[int] | None = None) -> Workload:
    """``n_stages`` stages of ``layers`` x (Linear(width, width) + GELU); a batch of
    ``rows * n_microbatches`` rows; loss ``sum(output * target)``. With ``only`` (a stage or
    stages), the other stages are built on the meta device (a rank runs only its own)."""
    torch.manual_seed(0)
    kept = None if only is None else {only} if isinstance(only, int) else set(only)

    def stage(index: int) -> nn.Module:
        with torch.device("cpu" if kept is None or index in kept else "meta"):
            return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.GELU())])

    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(rows * n_microbatches, width, generator=generator)
    target = torch.randn(rows * n_microbatches, width, generator=generator)
    return Workload([stage(i) for i in range(n_stages)], inputs, target, sum_loss)


class _Checkpointed(nn.Module):
    """A stage under ``torch.utils.checkpoint`` (non-reentrant): torch's nearest to recompute."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.inner, x, use_reentrant=False)


def _parameter_storages(modules: list[nn.Module]) -> set[int]:
    return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}


def _one_microbatch(stage: nn.Module, index: int, n_stages: int, work: Workload, rows: int) -> int:
    """Saved bytes of one micro-batch's forward of ``stage`` (plus the loss on the last stage)."""
    counter = SavedBytes(_parameter_storages([stage]))
    x = work.inputs[:rows].clone().requires_grad_(index > 0)
    with counter.hooks():
        out = stage(x)
        if index == n_stages - 1:
            out = work.loss_fn(out, work.target[:rows])
        saved = counter.current
    del out
    return saved


# --- worker -----------------------------------------------------------------------------------------
def _measure(step: Callable[[], None], exclude: set[int], warmup: int, steps: int) -> dict[str, Any]:
    """Warm up, then ``steps`` tracked steps: peaks of both counters per step and the last
    step's saved-bytes timeline (seconds from its start)."""
    for _ in range(warmup):
        step()
    saved, live = SavedBytes(exclude), LiveTensors()
    peaks: list[tuple[int, int]] = []
    events: list[tuple[float, int]] = []
    for _ in range(steps):
        dist.barrier()
        saved.reset_peak()
        saved.recording = True
        start = time.perf_counter()
        with saved.hooks(), live:
            live.reset_peak()
            base = live.current
            step()
        saved.recording = False
        peaks.append((saved.peak, live.peak - base))
        events = [(start, saved.current)] + saved.events
        events = [(t - start, value) for t, value in events] + [(time.perf_counter() - start, saved.current)]
    return {"saved": [p[0] for p in peaks], "all": [p[1] for p in peaks], "events": events,
            "left": saved.current}


def worker(rank: int, world: int, names: list[str], width: int, quick: bool) -> dict[str, Any] | None:
    """Per case, conveyor then torch: per-stage peaks (gathered on rank 0)."""
    torch.set_num_threads(1)
    torch_group = dist.new_group(list(range(world)))
    warmup, steps = (1, 1) if quick else (2, MEASURED_STEPS)
    probe = memory_workload(world, width=width, only=rank)
    results: dict[str, Any] = {"microbatch": _one_microbatch(probe.stages[rank], rank, world, probe, ROWS),
                               "input": ROWS * width * probe.inputs.element_size()}
    for name in names:
        schedule, recompute = CASES[name]
        a, b = memory_workload(world, width=width, only=rank), memory_workload(world, width=width, only=rank)
        runner = conveyor.PipelineRunner(conveyor.pipeline(list(a.stages)), schedule=schedule,
                                         n_microbatches=N_MICROBATCHES, loss_fn=a.loss_fn, recompute=recompute,
                                         device="cpu")

        def pipe_step(runner: conveyor.PipelineRunner = runner, a: Workload = a) -> None:
            runner.step(a.inputs, target=a.target)

        sent = runner.transport.bytes_sent
        ours = _measure(pipe_step, _parameter_storages(runner.modules), warmup, steps)
        ours["peak_stashed"] = runner.peak_stashed.get(rank)
        ours["sent"] = (runner.transport.bytes_sent - sent) // (warmup + steps)  # per step
        del runner, pipe_step
        modules = [_Checkpointed(m) for m in b.stages] if recompute else b.stages
        reference, _ = torch_step(modules, schedule, N_MICROBATCHES, b.loss_fn, b.inputs, b.target,
                                  group=torch_group)
        theirs = _measure(reference, _parameter_storages([modules[rank]]), warmup, steps)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"conveyor": ours, "torch": theirs})
        results[name] = gathered
    every: list[Any] = [None] * world
    dist.all_gather_object(every, (results["microbatch"], results["input"]))
    results["per_stage"] = every
    return results if rank == 0 else None


def _placement(name: str, n_ranks: int) -> list[int]:
    n_stages = n_ranks * RANK_CASES[name]
    return [min(s, n_stages - 1 - s) if RANK_CASES[name] == 2 else s for s in range(n_stages)]


def rank_bound(name: str, n_ranks: int, n_microbatches: int, stage_bytes: dict[int, int], rank: int) -> int:
    """The simulator's bound on ``rank``'s saved bytes: the most, over the step, of the sum of
    ``stage_bytes[s]`` over the (stage, micro-batch) activations live on the rank (from a
    forward's start to the end of its B or W); with one stage per rank, ``peak_activations``
    times one micro-batch's bytes."""
    result = simulate(name, n_ranks * RANK_CASES[name], n_microbatches, n_ranks=n_ranks)
    timing = {event.action: (event.start, event.end) for event in result.events}
    points: list[tuple[float, int]] = []
    for stage in result.schedule.stages_of(rank):
        for microbatch in range(n_microbatches):
            start = timing[Action(FORWARD, stage, microbatch)][0]
            end = max(timing[a][1] for a in (Action(k, stage, microbatch) for k in (BACKWARD, WEIGHT_GRAD))
                      if a in timing)
            points += [(round(start, 9), stage_bytes[stage]), (round(end, 9), -stage_bytes[stage])]
    live = peak = 0
    for _, change in sorted(points, key=lambda p: (p[0], p[1])):  # a release at t before an allocation at t
        live += change
        peak = max(peak, live)
    return peak


def rank_worker(rank: int, world: int, names: list[str], width: int, quick: bool) -> dict[str, Any] | None:
    """Per schedule: this rank's peak saved bytes in conveyor (all its stages together) and one
    micro-batch's saved bytes per stage it holds (gathered on rank 0)."""
    torch.set_num_threads(1)
    warmup, steps = (1, 1) if quick else (2, MEASURED_STEPS)
    results: dict[str, Any] = {}
    for name in names:
        placement = _placement(name, world)
        mine = [stage for stage, holder in enumerate(placement) if holder == rank]
        n_stages, layers = len(placement), LAYERS // RANK_CASES[name]
        work = memory_workload(n_stages, width=width, layers=layers, only=mine)
        stage_bytes = {stage: _one_microbatch(work.stages[stage], stage, n_stages, work, ROWS) for stage in mine}
        runner = conveyor.PipelineRunner(conveyor.pipeline(list(work.stages)), schedule=name,
                                         n_microbatches=N_MICROBATCHES, loss_fn=work.loss_fn, device="cpu")

        def pipe_step(runner: conveyor.PipelineRunner = runner, work: Workload = work) -> None:
            runner.step(work.inputs, target=work.target)

        measured = _measure(pipe_step, _parameter_storages(runner.modules), warmup, steps)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, {"saved": measured["saved"], "left": measured["left"],
                                          "events": measured["events"], "stage_bytes": stage_bytes})
        results[name] = gathered
        del runner, pipe_step
    return results if rank == 0 else None


def _rank_table(section: Section, results: dict[str, Any], figures: Path, plan: Plan) -> None:
    """The per-rank table of the issue-19 schedules: measured peak saved bytes against the bound."""
    table = Table(["schedule", "rank", "stages", "sim rank peak (stage-mb)", "bound MiB", "ours saved MiB",
                   "ours / bound", "vs 1f1b rank 0"])
    chart: dict[str, list[tuple[float, float | None, float]]] = {}
    timelines: dict[str, list[list[tuple[float, int]]]] = {}
    reference = results["1f1b"][0]["saved"][-1] if "1f1b" in results else None
    off: list[str] = []
    for name, gathered in results.items():
        sim = simulate(name, N_RANKS * RANK_CASES[name], N_MICROBATCHES, n_ranks=N_RANKS)
        stage_bytes = {stage: nbytes for data in gathered for stage, nbytes in data["stage_bytes"].items()}
        chart[name], timelines[name] = [], [data["events"] for data in gathered]
        for rank, data in enumerate(gathered):
            bound = rank_bound(name, N_RANKS, N_MICROBATCHES, stage_bytes, rank)
            saved = data["saved"][-1]
            if saved != bound:
                off.append(f"{name} rank {rank}: {saved} bytes measured, bound {bound}")
            table.rows.append([name if rank == 0 else "", str(rank),
                               " ".join(map(str, sim.schedule.stages_of(rank))),
                               str(sim.rank_peak_activations[rank]), _mib(bound), _mib(saved), ratio(saved / bound),
                               "" if reference is None else ratio(saved / reference)])
            chart[name].append((saved / MiB, None, bound / MiB))
    section.tables.append(table)
    section.notes.append(
        "Issue 19, per rank (conveyor only; every rank holds 4 x (Linear + GELU) in all schedules, so a V "
        "rank's two stages have 2 each): *sim rank peak*: `simulate(...).rank_peak_activations`, live (stage, "
        "micro-batch) pairs, a half-size stage's micro-batch counting 1; *bound*: the most, over the simulated "
        "step, of the live pairs' saved bytes (one micro-batch's saved bytes per stage, measured as above; the "
        "last stage's loss saves more); *vs 1f1b rank 0*: this rank's measured peak over 1f1b's rank 0. "
        + ("Every measured peak equals its bound to the byte." if not off else
           "Measured peaks that differ from the bound: " + "; ".join(off) + "."))
    _add_figures(section, chart, timelines if plan.timelines else None, figures / "memory_ranks",
                 "peak saved activations per rank, MiB", "per rank")


# --- report -----------------------------------------------------------------------------------------
def _add_figures(section: Section, chart: Any, timelines: Any, stem: Path, bars_title: str, per: str) -> None:
    """The peak bars (``<stem>.png``) and, given timelines, their curves (``<stem>_timeline.png``)."""
    figure = charts.memory_bars(chart, stem.with_name(stem.name + ".png"), bars_title)
    if figure is not None:
        section.figures.append(figure)
    if timelines is not None:
        figure = charts.memory_timelines(timelines, stem.with_name(stem.name + "_timeline.png"),
                                         f"conveyor: saved activation MiB during the step, {per}")
        if figure is not None:
            section.figures.append(figure)


def _mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.2f}"


def run(plan: Plan, figures: Path, names: list[str] | None = None) -> Section:
    """Run the benchmark and build its report section."""
    names = names or list(CASES)
    started = time.perf_counter()
    quick = plan == QUICK
    width = QUICK_WIDTH if quick else WIDTH
    results = conveyor.launch(worker, N_RANKS, args=(names, width, quick), threads_per_rank=1, timeout=900)[0]
    rank_names = ["1f1b", "v-min"] if quick else list(RANK_CASES)
    per_rank = conveyor.launch(rank_worker, N_RANKS, args=(rank_names, width, quick), threads_per_rank=1,
                               timeout=900)[0]
    per_stage = results["per_stage"]
    section = Section("memory", f"5. Activation memory ({N_RANKS} stages on {N_RANKS} processes, "
                                f"{N_MICROBATCHES} micro-batches)")
    mb_kib = ", ".join(f"{per_stage[s][0] / 1024:.0f}" for s in range(N_RANKS))
    section.text.append(
        f"Each stage is {LAYERS} x (Linear({width}, {width}) + GELU); a micro-batch is {ROWS} rows "
        f"({per_stage[0][1] // 1024} KiB per boundary tensor); loss `sum(output * target)` on the last stage. "
        "Measured in every rank during one step after warm-up, the same way in both libraries:")
    section.text.append(
        "* **saved** (the quantity the bound describes): `torch.autograd.graph.saved_tensors_hooks` around the "
        "step. The pack hook adds the bytes of each tensor autograd saves for backward (once per distinct memory "
        "span, however many nodes save it; parameters excluded) and returns a wrapper whose release, when "
        "autograd frees the saved variable or the graph dies, subtracts them. Peak of the live sum.\n"
        "* **all tensors**: a `TorchDispatchMode` that sees every storage an op allocates during the step and a "
        "`weakref.finalize` that sees it freed; peak of the live sum above the step's starting level (the CPU "
        "analogue of CUDA's `max_memory_allocated`). It also counts what autograd does not save: stage outputs "
        "held for the backward, received inputs, gradients in flight, message buffers, temporaries.")
    section.text.append(
        "*Bound* = micro-batches live at the peak (`simulate(...).peak_activations`, which equals conveyor's "
        "`runner.peak_stashed`) x one micro-batch's saved bytes (the same hooks on a lone forward of that stage: "
        f"{mb_kib} KiB for stages 0..{N_RANKS - 1}; the last stage's loss also saves its output and the target "
        "slice). With recompute the stash keeps only each micro-batch's input, outside autograd, and one "
        "micro-batch's activations exist at a time (while it is re-materialised for its backward): bound = "
        "1 micro-batch; the held inputs appear only in *all tensors*. torch.distributed.pipelining has no "
        "recompute option: its gpipe+recompute row wraps each stage in `torch.utils.checkpoint` (non-reentrant), "
        "which installs its own saved-tensor hooks, so ours never see its tensors (*saved* n/a there); "
        "*all tensors* measures it the same way as ours.")
    table = Table(["schedule", "stage", "sim peak (mb)", "peak_stashed", "bound MiB", "ours saved MiB",
                   "ours / bound", "torch saved MiB", "torch / bound", "ours all tensors MiB",
                   "torch all tensors MiB", "ours sent per step MiB"])
    chart: dict[str, list[tuple[float, float | None, float]]] = {}
    timelines: dict[str, list[list[tuple[float, int]]]] = {}
    disagreements: list[str] = []
    over_bound: list[str] = []
    for name in names:
        schedule, recompute = CASES[name]
        sim = simulate(schedule, N_RANKS, N_MICROBATCHES)
        gathered = results[name]
        chart[name] = []
        timelines[name] = [g["conveyor"]["events"] for g in gathered]
        for stage in range(N_RANKS):
            ours, theirs = gathered[stage]["conveyor"], gathered[stage]["torch"]
            for library, data in (("conveyor", ours), ("torch", theirs)):
                if len(set(data["saved"])) > 1 or data["left"]:
                    disagreements.append(f"{library} {name} stage {stage}: saved peaks "
                                         f"{', '.join(_mib(v) for v in data['saved'])} MiB, "
                                         f"{data['left']} bytes left after the step")
            one = per_stage[stage][0]
            bound = one * (1 if recompute else sim.peak_activations[stage])
            stashed = ours["peak_stashed"]
            if ours["saved"][-1] > bound * 1.01:
                over_bound.append(f"conveyor {name} stage {stage} ({ratio(ours['saved'][-1] / bound)}x)")
            torch_saved = None if recompute else theirs["saved"][-1]
            table.rows.append([
                name if stage == 0 else "", str(stage), str(sim.peak_activations[stage]), str(stashed),
                _mib(bound) + (" (1 mb)" if recompute else ""), _mib(ours["saved"][-1]),
                ratio(ours["saved"][-1] / bound),
                "n/a" if torch_saved is None else _mib(torch_saved),
                "n/a" if torch_saved is None else ratio(torch_saved / bound),
                _mib(ours["all"][-1]), _mib(theirs["all"][-1]), _mib(ours["sent"])])
            chart[name].append((ours["saved"][-1] / MiB, None if torch_saved is None else torch_saved / MiB,
                                bound / MiB))
        first = gathered[0]
        section.headline.append([
            f"{name}: stage 0 peak saved MiB (bound {_mib(chart[name][0][2] * MiB)})",
            _mib(first["conveyor"]["saved"][-1]),
            "n/a" if recompute else _mib(first["torch"]["saved"][-1]),
            f"all tensors {_mib(first['conveyor']['all'][-1])} vs {_mib(first['torch']['all'][-1])} MiB"])
    section.tables.append(table)
    section.short = "5. memory"
    section.notes.append(
        "*sim peak*: `conveyor.schedule.simulate(schedule, 4, 8).peak_activations` per stage (a micro-batch is "
        "live from its F to the end of its B, or of its W for zb-h1); *peak_stashed*: conveyor's "
        "`runner.peak_stashed` after the step (with recompute: micro-batches whose inputs were held). "
        "Peaks are per process, one stage per process. "
        + f"Tracked steps per case and library: {len(results[names[0]][0]['conveyor']['saved'])}; "
        + ("their peaks agreed everywhere except: " + "; ".join(disagreements) + " (the last step is reported)."
           if disagreements else "their peaks agreed everywhere."))
    section.notes.append(
        "*ours sent per step*: bytes conveyor's transport sent in one step (activations and gradients, plus "
        "headers). Every send is a copy into a fresh buffer (`runtime/comm.py`, `_encode`) that the transport "
        "keeps until `finish()` at the end of the step, so these bytes count in *all tensors* (the send buffers "
        "of the sends made before the peak).")
    if over_bound:
        section.notes.append(
            "Over the bound: " + ", ".join(over_bound) + ". With `recompute=True` the forward's graph is meant "
            "to be dropped at once (`runtime/stage.py`), but the stage output stays referenced from a reference "
            "cycle: `runtime/bundle.py`'s `flatten` builds its tensor list in a recursive closure (`visit`) that "
            "refers to itself through its cell, so that list, and through the output the whole graph with its "
            "saved activations, lives until Python's cyclic garbage collector runs. How many micro-batches pile "
            "up depends on when the collector runs" + (" (the timeline shows the saw-tooth)" if plan.timelines else "")
            + ". The last stage returns its "
            "loss without flattening its output and stays at the bound. Without recompute the same cycle keeps "
            "only the output tensors (the backward already freed the saved activations): they show in "
            "*all tensors*, not in *saved*.")
    _add_figures(section, chart, timelines if plan.timelines else None, figures / "memory",
                 "peak saved activations, MiB", "per stage")
    _rank_table(section, per_rank, figures, plan)
    section.seconds = time.perf_counter() - started
    return section
