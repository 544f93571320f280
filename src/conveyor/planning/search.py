"""``conveyor.plan``: search split points, schedule and micro-batch count for a :class:`Profile`.

Synchronous candidates are timed with the simulator (``conveyor.schedule.simulate`` for the
bubble and the activations kept alive; :func:`.costs.shared_core_makespan` for the step time when
ranks share cores). PipeDream and 2BW (also with replicated stages) are priced analytically
(:func:`.costs.async_steady_state`). Every candidate gets a peak memory per rank and whether it
fits; they are ranked by throughput (samples/s), those that fit first, then those the runner
accepts (:mod:`.runnable`), then those of classes the model predicts well (``confidence``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

from ..partition.balance import partition_min_max
from ..schedule import ScheduleError, search, simulate, supports_replicas
from .costs import (
    MemoryEstimate,
    action_costs,
    async_steady_state,
    block_seconds,
    compute_slots,
    in_stream,
    message_time,
    rank_memory,
    shared_core_makespan,
    sharing_factor,
    stage_costs,
    stage_ranges,
    time_balanced_split,
    with_updates,
)
from .profile import Profile
from .runnable import runner_refusal

__all__ = ["ASYNC_SCHEDULES", "AUTO_SCHEDULE", "Candidate", "Plan", "SYNC_SCHEDULES", "microbatch_counts", "plan"]

SYNC_SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")
ASYNC_SCHEDULES = ("pipedream", "pipedream-2bw")


@dataclass
class Candidate:
    """One configuration and what the model predicts for it."""

    schedule: str
    sizes: tuple[int, ...]        # blocks per stage
    split: str                    # "time", "params" or "time = params"
    n_microbatches: int
    rows: float                   # rows per micro-batch
    n_ranks: int
    placement: tuple[int, ...]    # rank of each stage
    step_s: float                 # predicted step (async: batch_size / throughput)
    throughput: float             # samples per second
    bubble: float                 # idle share of the ranks (async: 1 - mean stage time / slowest)
    ideal_step_s: float           # the simulator's makespan with a core per rank
    message_s: float
    memory: list[MemoryEstimate]
    fits: bool = True
    replicas: tuple[int, ...] | None = None
    peak_microbatches: tuple[int, ...] = ()
    stage_seconds: tuple[float, ...] = ()  # F + B per micro-batch of each stage
    tied_across_stages: bool = False       # a weight held by blocks of two stages (GPT-2's wte / lm_head)
    confidence: str = "high"               # "medium"/"low": a class the model predicts less well (see why)
    confidence_note: str = ""

    @property
    def n_stages(self) -> int:
        return len(self.sizes)

    @property
    def is_async(self) -> bool:
        return self.schedule in ASYNC_SCHEDULES

    @property
    def refusal(self) -> str | None:
        """What ``PipelineRunner`` would refuse this layout with (None: it runs); see :mod:`.runnable`."""
        return runner_refusal(self.schedule, self.n_ranks, self.n_stages, self.n_microbatches,
                              tuple(self.replicas) if self.replicas else None, self.tied_across_stages)

    @property
    def runnable(self) -> bool:
        """Whether the runtime accepts it: the runner's own checks (schedule, replicas, micro-batch
        count, tied weights) pass."""
        return self.refusal is None

    @property
    def peak_memory(self) -> float:
        return max(m.total for m in self.memory)

    def label(self) -> str:
        replicas = f" replicas {list(self.replicas)}" if self.replicas else ""
        return f"{self.schedule} {list(self.sizes)}{replicas}, m={self.n_microbatches}"


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB" if n_bytes < 2**30 else f"{n_bytes / 2**30:,.2f} GiB"


@dataclass
class Plan:
    """Candidates ranked best first; :meth:`explain` says why the first one won."""

    candidates: list[Candidate]
    n_ranks: int
    batch_size: int
    memory_per_rank: float | None
    profile: Profile = field(repr=False)
    reshare: bool = False

    @property
    def best(self) -> Candidate:
        return self.candidates[0]

    @property
    def best_runnable(self) -> Candidate | None:
        return next((c for c in self.candidates if c.fits and c.runnable), None)

    def top(self, k: int = 3, runnable: bool = False) -> list[Candidate]:
        chosen = [c for c in self.candidates if c.runnable] if runnable else self.candidates
        return chosen[:k]

    def table(self, k: int = 10) -> str:
        header = (f"{'#':>2}  {'schedule':<17}{'stages (blocks each)':<24}{'m':>4}{'step ms':>10}{'samples/s':>11}"
                  f"{'bubble':>8}{'peak mem':>12}  fits  runnable  confidence")
        lines = [header]
        for index, c in enumerate(self.candidates[:k], 1):
            stages = str(list(c.sizes)) + (f" x{list(c.replicas)}" if c.replicas else "")
            lines.append(f"{index:>2}  {c.schedule:<17}{stages:<24}{c.n_microbatches:>4}{c.step_s * 1e3:>10.1f}"
                         f"{c.throughput:>11.1f}{c.bubble:>8.1%}{_mb(c.peak_memory):>12}  "
                         f"{'yes' if c.fits else 'NO':<4}  {'yes' if c.runnable else 'no':<8}  {c.confidence}")
        return "\n".join(lines)

    def explain(self) -> str:
        """A few lines a person can check against the profile and the closed forms."""
        best = self.best
        p = self.profile
        contention = "" if p.concurrent <= 1 else \
            f", timed by {p.concurrent} processes at once (times divided by their sharing factor " \
            f"{sharing_factor(p):.1f}, then shared again where ranks overlap)" if self.reshare else \
            f", timed by {p.concurrent} processes at once (core sharing included as measured)"
        lines = [f"Profile: {p.n_blocks} blocks ({p.units}) of {p.model}{contention}; link "
                 f"{p.link.latency_s * 1e6:.0f} us + {p.link.bandwidth_bytes_s / 1e9:.2f} GB/s ({p.link.source}); "
                 f"runtime overhead {p.action_overhead_s * 1e3:.2f} ms per action{_in_stream_note(p)}.",
                 f"Choice: {best.label()} (split by {best.split}), {best.rows:g} rows per micro-batch: predicted "
                 f"step {best.step_s * 1e3:.1f} ms, {best.throughput:.1f} samples/s."]
        lines += self._why(best)
        if best.confidence != "high":
            lines.append(f"  {best.confidence} confidence: {best.confidence_note}.")
        doubtful = next((c for c in self.candidates if c.confidence != best.confidence and c.fits and c.runnable
                         and c.throughput > best.throughput), None)
        if doubtful is not None:
            lines.append(f"  ranked after it despite a faster prediction ({doubtful.step_s * 1e3:.1f} ms): "
                         f"{doubtful.label()}, {doubtful.confidence} confidence: {doubtful.confidence_note}.")
        runnable = self.best_runnable
        if runnable is not None and runnable is not best:
            lines.append(f"{best.label()} is not runnable here; best runnable: {runnable.label()} "
                         f"(split by {runnable.split}): {runnable.step_s * 1e3:.1f} ms, "
                         f"{runnable.throughput:.1f} samples/s.")
            lines += self._why(runnable)
        lines += self._alternatives(runnable or best)
        return "\n".join(lines)

    def _why(self, c: Candidate) -> list[str]:
        slowest = max(range(c.n_stages), key=lambda s: c.stage_seconds[s])
        lines = [f"  slowest stage {slowest}: F+B {c.stage_seconds[slowest] * 1e3:.2f} ms per micro-batch "
                 f"(stages: {', '.join(f'{t * 1e3:.2f}' for t in c.stage_seconds)} ms); messages "
                 f"{c.message_s * 1e3:.2f} ms."]
        if c.is_async:
            lines.append(f"  asynchronous (no flush, stale weights): a micro-batch leaves every "
                         f"{c.step_s / c.n_microbatches * 1e3:.2f} ms in steady state.")
        else:
            p, m = c.n_ranks, c.n_microbatches
            lines.append(f"  bubble {c.bubble:.1%} (equal stages would give (p-1)/(m+p-1) = "
                         f"{(p - 1) / (m + p - 1):.1%} for 1F1B/GPipe with p={p}, m={m}).")
            if c.step_s > c.ideal_step_s * 1.001:
                lines.append(f"  {c.n_ranks} ranks share {self.profile.cores} cores: the step stretches from "
                             f"{c.ideal_step_s * 1e3:.1f} ms (a core per rank) to {c.step_s * 1e3:.1f} ms.")
        worst = max(range(len(c.memory)), key=lambda r: c.memory[r].total)
        memory = c.memory[worst]
        limit = f"fits {_mb(self.memory_per_rank)}" if self.memory_per_rank and c.fits else \
            f"exceeds {_mb(self.memory_per_rank)}" if self.memory_per_rank else "no limit given"
        lines.append(f"  memory: rank {worst} peaks at {_mb(memory.total)} (weights {_mb(memory.weights)}, grads "
                     f"{_mb(memory.gradients)}, optimizer {_mb(memory.optimizer)}, activations "
                     f"{_mb(memory.activations)} for up to {max(c.peak_microbatches or (0,))} micro-batches); "
                     f"{limit}.")
        return lines

    def _alternatives(self, chosen: Candidate) -> list[str]:
        lines = ["Alternatives:"]

        def first(predicate: Callable[[Candidate], bool]) -> Candidate | None:
            return next((c for c in self.candidates if c is not chosen and predicate(c)), None)
        other_split = first(lambda c: c.schedule == chosen.schedule and c.sizes != chosen.sizes
                            and c.n_microbatches == chosen.n_microbatches)
        if other_split is not None:
            lines.append(f"  split by {other_split.split} {list(other_split.sizes)}: {other_split.step_s * 1e3:.1f} "
                         f"ms (slowest stage {max(other_split.stage_seconds) * 1e3:.2f} ms vs "
                         f"{max(chosen.stage_seconds) * 1e3:.2f} ms).")
        for name in SYNC_SCHEDULES + ASYNC_SCHEDULES + (AUTO_SCHEDULE,):
            if name == chosen.schedule:
                continue
            c = first(lambda c, name=name: c.schedule == name)
            if c is None:
                continue
            why = "does not fit" if not c.fits else f"{c.throughput / chosen.throughput:.0%} of the throughput"
            extra = "" if c.runnable else " (not runnable: see Candidate.runnable)"
            lines.append(f"  best {name}: {c.label()}: {c.step_s * 1e3:.1f} ms, {_mb(c.peak_memory)} peak; "
                         f"{why}{extra}.")
        for m in sorted({c.n_microbatches for c in self.candidates if c.schedule == chosen.schedule}):
            c = first(lambda c, m=m: c.schedule == chosen.schedule and c.n_microbatches == m)
            if c is not None and m != chosen.n_microbatches and abs(m - chosen.n_microbatches) <= chosen.n_microbatches:
                lines.append(f"  {chosen.schedule} with m={m}: {c.step_s * 1e3:.1f} ms, bubble {c.bubble:.1%}"
                             f"{'' if c.fits else ', does not fit'}.")
        return lines

    def to_json(self, verified: Sequence[dict] | None = None) -> str:
        """Every candidate with its prediction; ``verified`` (``Verified.to_dict()`` of each run
        candidate, from :func:`conveyor.planning.verify.verify`) adds the measurements."""
        rows = []
        for c in self.candidates:
            entry = asdict(c)
            entry.update(runnable=c.runnable, refusal=c.refusal, peak_memory=c.peak_memory, is_async=c.is_async,
                         label=c.label())
            rows.append(entry)
        data = {"n_ranks": self.n_ranks, "batch_size": self.batch_size, "memory_per_rank": self.memory_per_rank,
                "in_stream": dict(self.profile.in_stream), "candidates": rows}
        if verified is not None:
            data["verified"] = list(verified)
        return json.dumps(data, indent=1)


def _in_stream_note(profile: Profile) -> str:
    """``; measured inside a pipeline (a traced 1F1B run): F x1.10, B x1.05, U x2.92`` when
    calibrated (``S``: the stretch of a synchronous step on shared cores)."""
    if not profile.in_stream:
        return ""
    factors = ", ".join(f"{kind} x{factor:.2f}" for kind, factor in profile.in_stream.items())
    return f"; measured inside a pipeline (a traced 1F1B run): {factors}"


def microbatch_counts(batch_size: int) -> list[int]:
    """Divisors of the batch size and powers of two up to it."""
    divisors = {d for d in range(1, batch_size + 1) if batch_size % d == 0}
    powers = {1 << k for k in range(batch_size.bit_length()) if 1 << k <= batch_size}
    return sorted(divisors | powers)


def _splits(profile: Profile, n_stages: int, rows: float) -> dict[tuple[int, ...], str]:
    """Contiguous min-max splits by F+B time and by parameter bytes (merged when equal)."""
    by_time = time_balanced_split(profile, n_stages, rows)
    by_params = tuple(partition_min_max([float(b.param_bytes) for b in profile.blocks], n_stages))
    return {by_time: "time"} if by_time == by_params else {by_time: "time", by_params: "params"}


def _stage_layouts(schedule: str, n_ranks: int, n_blocks: int, max_chunks: int) -> list[int]:
    """Numbers of stages to try for a schedule on ``n_ranks`` ranks."""
    if schedule == "interleaved-1f1b":
        return [v * n_ranks for v in range(2, max_chunks + 1) if v * n_ranks <= n_blocks]
    if schedule == "zb-v":
        return [2 * n_ranks] if 2 * n_ranks <= n_blocks else []
    return [n_ranks] if n_ranks <= n_blocks else []


def _sync_candidate(profile: Profile, schedule: str, sizes: tuple[int, ...], split: str, m: int,
                    batch_size: int, n_ranks: int, slots: float, optimizer_factor: float) -> Candidate | None:
    rows = batch_size / m
    priced = action_costs(profile, sizes, rows)
    costs, comm = priced.table(), priced.comm
    try:
        result = simulate(schedule, len(sizes), m, costs, n_ranks=n_ranks, comm=comm)
    except (ScheduleError, ValueError):
        return None  # e.g. interleaving needs m >= ranks
    program = result.schedule
    step = result.makespan if slots >= n_ranks else \
        shared_core_makespan(program, costs, comm, slots) * in_stream(profile, "S")
    # the optimizer step after the last action of each rank (shared cores: stretched alike)
    step += with_updates(result.events, n_ranks, program.placement, priced.U, result.makespan) - result.makespan
    memory = rank_memory(profile, sizes, program.placement, rows, result.peak_activations, schedule,
                         optimizer_factor, n_ranks)
    stage_seconds = tuple(f + b for f, b in zip(costs["F"], costs["B"]))
    return Candidate(schedule, sizes, split, m, rows, n_ranks, tuple(program.placement), step, batch_size / step,
                     result.bubble, result.makespan, comm, memory, peak_microbatches=result.peak_activations,
                     stage_seconds=stage_seconds)


def _replica_layouts(profile: Profile, n_ranks: int, rows: float) -> Iterable[tuple[tuple[int, ...], tuple[int, ...]]]:
    """For 2 <= stages < ranks: a time-balanced split, the spare ranks given one by one to the
    stage that is slowest per replica."""
    time_costs = block_seconds(profile, rows)
    for n_stages in range(2, min(n_ranks, profile.n_blocks + 1)):
        sizes = tuple(partition_min_max(time_costs, n_stages))
        per_stage = [sum(time_costs[b] for b in blocks) for blocks in stage_ranges(sizes)]
        replicas = [1] * n_stages
        for _ in range(n_ranks - n_stages):
            slowest = max(range(n_stages), key=lambda s: per_stage[s] / replicas[s])
            replicas[slowest] += 1
        yield sizes, tuple(replicas)


def _replica_wait_steady_state(profile: Profile, schedule: str, sizes: tuple[int, ...], rows: float,
                               replicas: tuple[int, ...] | None, m: int) -> float:
    """For a runnable replicated layout, the simulator's steady state per micro-batch, which also
    models replicas waiting for each other at every update (the closed form does not: with NOAM
    admission that wait can cost a third of the replicas' gain, docs/async.md); 0 otherwise."""
    if not replicas or all(r == 1 for r in replicas) or not supports_replicas(schedule) \
            or any(m % r for r in replicas):
        return 0.0
    costs = stage_costs(profile, sizes, rows)
    message = message_time(profile, sizes, rows)
    table = {"F": [f + message for f in costs["F"]], "B": [b + message for b in costs["B"]]}
    length = 12 * max(replicas) * m
    short, long = (simulate(schedule, len(sizes), n, table, n_ranks=sum(replicas), replicas=list(replicas)).makespan
                   for n in (length, 2 * length))
    return (long - short) / length


def _async_candidate(profile: Profile, schedule: str, sizes: tuple[int, ...], split: str, m: int, batch_size: int,
                     n_ranks: int, replicas: tuple[int, ...] | None, slots: float,
                     optimizer_factor: float) -> Candidate:
    rows = batch_size / m
    estimate = async_steady_state(profile, sizes, rows, replicas or (1,) * len(sizes), schedule, slots)
    per_microbatch = max(estimate.seconds_per_microbatch,
                         _replica_wait_steady_state(profile, schedule, sizes, rows, replicas, m))
    step = per_microbatch * m
    n_stages = len(sizes)
    peaks = tuple(n_stages - s for s in range(n_stages))  # 1F1B-like stash in steady state
    placement = tuple(range(n_stages))  # one replica's view: memory per replica rank
    memory = rank_memory(profile, sizes, placement, rows, peaks, schedule, optimizer_factor, n_stages)
    mean = sum(estimate.stage_seconds) / n_stages
    costs = stage_costs(profile, sizes, rows)
    return Candidate(schedule, sizes, split, m, rows, n_ranks, placement, step, batch_size / step,
                     1 - mean / max(estimate.stage_seconds), step, message_time(profile, sizes, rows), memory,
                     replicas=replicas, peak_microbatches=peaks,
                     stage_seconds=tuple(f + b for f, b in zip(costs["F"], costs["B"])))


CONFIDENCE = ("high", "medium", "low")  # ranked in this order, after fitting and runnable
WHY = {
    "replicated": "replicas wait for each other at every update and share the cores; replicated layouts were "
                  "measured 6-40% slower than predicted (docs/planning.md, section 4)",
    "shared": "more ranks than cores: the sharing of the cores is modelled (and calibrated on one 1F1B run), and "
              "such runs missed by up to 33% (median 11%), and a small model's profile moved by up to a fifth "
              "between runs (docs/planning.md, section 4)",
}


def _confidence(candidate: Candidate, shared_cores: bool) -> tuple[str, str]:
    """``("low", why)`` for replicated layouts, ``("medium", why)`` when the ranks outnumber the
    cores, else ``("high", "")``: the classes docs/planning.md's accuracy table measured."""
    if candidate.replicas and any(r > 1 for r in candidate.replicas):
        return "low", WHY["replicated"]
    if shared_cores:
        return "medium", WHY["shared"]
    return "high", ""


def _tied_across_stages(profile: Profile, sizes: Sequence[int]) -> bool:
    stage_of = [stage for stage, size in enumerate(sizes) for _ in range(size)]
    return any(len({stage_of[block] for block in blocks}) > 1 for blocks in profile.tied_blocks)


# --- the automatic schedule as a candidate (conveyor.schedule.search; PipelineRunner(schedule="auto")) --------
AUTO_SCHEDULE = "auto"
AUTO_MAX_MICROBATCHES = 32  # the list scheduler's sweep grows with m: larger counts are left to the named schedules
AUTO_BUDGET_S = 0.1  # local search per candidate


def _auto_candidate(profile: Profile, sizes: tuple[int, ...], split: str, m: int, batch_size: int, n_ranks: int,
                    slots: float, optimizer_factor: float) -> Candidate | None:
    """The program ``search`` finds for one stage per rank at 1F1B's memory (``n_ranks`` micro-batches)."""
    if len(sizes) != n_ranks or m > AUTO_MAX_MICROBATCHES:
        return None
    rows = batch_size / m
    priced = action_costs(profile, sizes, rows)  # the costs every other candidate is priced with
    costs, comm = priced.table(), priced.comm
    program = search({kind: costs[kind] for kind in ("F", "I", "W")}, n_ranks, n_microbatches=m, comm=comm,
                     budget_s=AUTO_BUDGET_S)
    result = simulate(program, costs=costs, comm=comm)
    step = result.makespan if slots >= n_ranks else \
        shared_core_makespan(program, costs, comm, slots) * in_stream(profile, "S")
    step += with_updates(result.events, n_ranks, program.placement, priced.U, result.makespan) - result.makespan
    memory = rank_memory(profile, sizes, program.placement, rows, result.peak_activations, AUTO_SCHEDULE,
                         optimizer_factor, n_ranks)
    return Candidate(AUTO_SCHEDULE, sizes, split, m, rows, n_ranks, tuple(program.placement), step, batch_size / step,
                     result.bubble, result.makespan, comm, memory, peak_microbatches=result.peak_activations,
                     stage_seconds=tuple(f + b for f, b in zip(costs["F"], costs["B"])))


def plan(profile: Profile, n_ranks: int, *, memory_per_rank: float | None = None, batch_size: int | None = None,
         schedules: Sequence[str] | None = None, microbatches: Sequence[int] | None = None,
         optimizer_factor: float = 2.0, max_chunks: int = 4, cores: int | None = None,
         reshare: bool = False) -> Plan:
    """Rank pipeline configurations of ``profile``'s model on ``n_ranks`` ranks.

    ``memory_per_rank`` (bytes) marks candidates that do not fit; ``batch_size`` (rows per step,
    default the profile's largest micro-batch) is cut into each count of ``microbatches``
    (default :func:`microbatch_counts`). ``schedules`` defaults to every synchronous and
    asynchronous schedule and ``"auto"`` (:func:`conveyor.schedule.search`'s program, for up to
    ``AUTO_MAX_MICROBATCHES`` micro-batches); ``optimizer_factor`` is the optimizer state in units of the weights
    (Adam: 2, SGD with momentum: 1). ``cores`` overrides the profile's core count (0: a device
    per rank, no sharing). A profile taken by several processes at once (``concurrent > 1``) is
    used as measured, as if every rank were always busy; ``reshare=True`` instead divides out the
    processes' own sharing and models it only where ranks overlap (docs/planning.md compares both).
    """
    if n_ranks < 1:
        raise ValueError(f"n_ranks must be at least 1, got {n_ranks}")
    if n_ranks > profile.n_blocks:
        raise ValueError(f"{n_ranks} ranks need at least {n_ranks} blocks, the profile has {profile.n_blocks}; "
                         f"use at most {profile.n_blocks} ranks")
    batch_size = batch_size or max(profile.rows or (1,))
    measured = profile
    if cores is not None:
        profile = replace(profile, cores=cores)
    measured_cores = profile  # the machine's cores, before a concurrent profile's own sharing is taken as measured
    if profile.concurrent > 1 and not reshare:  # the sharing is in the times: take them as they are
        profile = replace(profile, cores=0, concurrent=1)
    known = SYNC_SCHEDULES + ASYNC_SCHEDULES + (AUTO_SCHEDULE,)
    names = list(schedules or known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown schedules {unknown}; the planner knows {list(known)}")
    slots = compute_slots(profile, n_ranks)
    counts = [m for m in (microbatches or microbatch_counts(batch_size)) if 1 <= m <= batch_size]
    candidates: list[Candidate] = []
    stale: dict[tuple, tuple[float, int]] = {}  # layout -> (best throughput so far, counts since it improved)

    def keep(key: tuple, candidate: Candidate | None) -> None:
        """Record ``candidate``; a layout whose fitting candidates stopped improving is not tried
        with more micro-batches (``(m + p - 1) (a + c / m)`` is convex in ``m``)."""
        if candidate is None:
            return
        candidates.append(candidate)
        if memory_per_rank is not None and candidate.peak_memory > memory_per_rank:
            return  # more micro-batches shrink the activations: a slower one may yet fit
        best, since = stale.get(key, (0.0, 0))
        stale[key] = (candidate.throughput, 0) if candidate.throughput > best else (best, since + 1)

    def tried_enough(key: tuple) -> bool:
        return stale.get(key, (0.0, 0))[1] >= 2

    for m in counts:
        rows = batch_size / m
        for name in names:
            if name == AUTO_SCHEDULE:
                for sizes, split in _splits(profile, n_ranks, rows).items():
                    if not tried_enough((name, split)):
                        keep((name, split), _auto_candidate(profile, sizes, split, m, batch_size, n_ranks, slots,
                                                            optimizer_factor))
                continue
            if name in ASYNC_SCHEDULES:
                for sizes, split in _splits(profile, n_ranks, rows).items():
                    if not tried_enough((name, split)):
                        keep((name, split), _async_candidate(profile, name, sizes, split, m, batch_size, n_ranks,
                                                             None, slots, optimizer_factor))
                for sizes, replicas in _replica_layouts(profile, n_ranks, rows):
                    if not tried_enough((name, len(sizes))):
                        keep((name, len(sizes)), _async_candidate(profile, name, sizes, "time", m, batch_size,
                                                                  n_ranks, replicas, slots, optimizer_factor))
                continue
            for n_stages in _stage_layouts(name, n_ranks, profile.n_blocks, max_chunks):
                for sizes, split in _splits(profile, n_stages, rows).items():
                    if not tried_enough((name, n_stages, split)):
                        keep((name, n_stages, split), _sync_candidate(profile, name, sizes, split, m, batch_size,
                                                                      n_ranks, slots, optimizer_factor))
    if not candidates:
        raise ValueError(f"no schedule fits {profile.n_blocks} blocks on {n_ranks} ranks with batch {batch_size}")
    for c in candidates:
        c.fits = memory_per_rank is None or c.peak_memory <= memory_per_rank
        c.tied_across_stages = _tied_across_stages(profile, c.sizes)
        c.confidence, c.confidence_note = _confidence(c, compute_slots(measured_cores, n_ranks) < n_ranks)
    order = {name: i for i, name in enumerate(known)}
    candidates.sort(key=lambda c: (not c.fits, not c.runnable, CONFIDENCE.index(c.confidence), -round(c.throughput, 9),
                                   round(c.peak_memory), order[c.schedule], c.n_microbatches))
    return Plan(candidates, n_ranks, batch_size, memory_per_rank, measured, reshare)
