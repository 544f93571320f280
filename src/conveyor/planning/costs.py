"""The planner's cost model: from a :class:`Profile` and a layout to per-stage action costs,
step time (with shared cores), memory per rank, and the asynchronous schedules' throughput.

- A stage costs the sum of its blocks at the micro-batch's rows (``fixed + per_row * rows``).
  Stage 0 receives no input gradient to compute (its inputs are data), so its split backward
  is all ``W``.
- Every action also pays the runtime's own overhead (``profile.action_overhead_s``, measured on an
  empty pipeline, which includes a hand-off's latency); a message then costs ``bytes /
  link.bandwidth`` more (or ``link.latency + bytes / bandwidth`` when no overhead was measured).
  The simulator takes one message time for all links, the largest boundary's.
- Shared cores: ``launch`` gives each of ``n`` ranks ``cores // n`` threads (at least one); when
  ``n * threads > cores``, the actions running at one moment share the cores equally
  (:func:`shared_core_makespan`). With enough cores it equals ``simulate``'s makespan. Times
  profiled by ``n`` processes at once are first brought back to one process's by the sharing
  factor ``n * threads / cores``; what other load slowed them by stays in them.
- Memory per rank: weights (one copy; PipeDream: ``n_stages - s`` versions on stage ``s``;
  2BW: 2) + gradients + optimizer state (``optimizer_factor`` x weights: 2 for Adam) +
  activations per micro-batch x the most micro-batches the schedule keeps alive at once.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

from ..partition.balance import partition_min_max
from ..schedule.actions import Schedule
from ..schedule.links import Message, outgoing, required_message
from .profile import Profile

__all__ = ["ActionCosts", "AsyncEstimate", "MemoryEstimate", "action_costs", "async_steady_state", "block_seconds",
           "boundary_bytes", "compute_slots", "in_stream", "message_time", "rank_memory", "shared_core_makespan",
           "sharing_factor", "stage_costs", "stage_ranges", "stage_stashes", "stage_updates", "time_balanced_split",
           "with_updates"]


def stage_ranges(sizes: Sequence[int]) -> list[range]:
    """``[2, 1]`` -> ``[range(0, 2), range(2, 3)]``: the blocks of each stage."""
    starts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [range(starts[i], starts[i + 1]) for i in range(len(sizes))]


def block_seconds(profile: Profile, rows: float) -> list[float]:
    """Each block's F + B at ``rows`` rows, as profiled: what a time-balanced split balances."""
    return [b.forward.at(rows) + b.backward.at(rows) for b in profile.blocks]


def time_balanced_split(profile: Profile, n_stages: int, rows: float) -> tuple[int, ...]:
    """Blocks per stage of the contiguous split whose slowest stage (F + B at ``rows``) is fastest."""
    return tuple(partition_min_max(block_seconds(profile, rows), n_stages))


def sharing_factor(profile: Profile) -> float:
    """How much slower each profiling process ran because ``profile.concurrent`` of them shared the
    cores; at least 1. A profile timed in CPU seconds (``clock="cpu"``: one thread per process, the
    default when ranks share cores) needs no correction: 1. Otherwise the wall time over the CPU time
    the processes measured in (``profile.stretch``), else the even share ``concurrent * threads /
    cores``. Dividing wall-clock medians by either is wrong for actions shorter than the scheduler's
    time slice: most of them run unpreempted, so their median is already about the solo time (4
    processes on 2 cores: stretch 2.0, medians 1.17x the 2-process ones), and halving them made the
    planner predict 4-rank steps about twice too fast. A profile taken by one process keeps whatever
    else loaded the machine in its times (factor 1)."""
    if profile.concurrent <= 1 or profile.cores <= 0 or profile.clock == "cpu":
        return 1.0
    if profile.stretch > 0:
        return max(1.0, profile.stretch)
    return max(1.0, profile.concurrent * profile.threads / profile.cores)


def stage_costs(profile: Profile, sizes: Sequence[int], rows: float) -> dict[str, list[float]]:
    """Seconds of F, B, I and W of each stage for a micro-batch of ``rows`` rows, on a core of its
    own (times profiled by several processes at once are divided by :func:`sharing_factor`)."""
    table: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
    alone = 1.0 / sharing_factor(profile)
    forward_factor = alone * in_stream(profile, "F")
    backward_factor = alone * in_stream(profile, "B")  # I and W too: halves of the backward
    for index, blocks in enumerate(stage_ranges(sizes)):
        chosen = [profile.blocks[b] for b in blocks]
        forward = sum(b.forward.at(rows) for b in chosen) * forward_factor
        backward = sum(b.backward.at(rows) for b in chosen) * backward_factor
        input_grad = 0.0 if index == 0 else sum(b.input_grad.at(rows) for b in chosen) * backward_factor
        weight_grad = backward if index == 0 else sum(b.weight_grad.at(rows) for b in chosen) * backward_factor
        for key, value in zip("FBIW", (forward, backward, input_grad, weight_grad)):
            table[key].append(value + profile.action_overhead_s)
    return table


def in_stream(profile: Profile, kind: str) -> float:
    """How much slower an action of ``kind`` (``F``, ``B``, ``U``) ran inside a pipeline than the
    profile timed it alone, or (``S``) how much longer a synchronous step on shared cores ran than
    its processor-sharing makespan (``planning/calibrate.py``); 1 where not calibrated."""
    return profile.in_stream.get(kind, 1.0)


def stage_updates(profile: Profile, sizes: Sequence[int]) -> list[float]:
    """Seconds of one optimizer step over each stage's parameters."""
    alone = in_stream(profile, "U") / sharing_factor(profile)
    return [sum(profile.blocks[b].update_s for b in blocks) * alone for blocks in stage_ranges(sizes)]


def stage_stashes(profile: Profile, sizes: Sequence[int]) -> list[float]:
    """Seconds of one copy of each stage's parameters (a weight version, which asynchronous
    schedules make after every update), priced with the update's in-stream factor."""
    alone = in_stream(profile, "U") / sharing_factor(profile)
    return [sum(profile.blocks[b].stash_s for b in blocks) * alone for blocks in stage_ranges(sizes)]


@dataclass(frozen=True)
class ActionCosts:
    """The one cost model every search prices programs with: per stage, the seconds of ``F``,
    ``B``, ``I``, ``W`` for a micro-batch, of an update ``U`` (optimizer step) and of a weight
    copy; ``comm``: one message's time between ranks (the slowest boundary's). :meth:`table` is
    what ``conveyor.schedule.simulate`` and the zero-bubble ``conveyor.schedule.search`` take."""

    F: tuple[float, ...]
    B: tuple[float, ...]
    I: tuple[float, ...]  # noqa: E741 - the zero-bubble papers' name for the input-gradient half
    W: tuple[float, ...]
    U: tuple[float, ...]
    stash: tuple[float, ...]
    comm: float

    def table(self) -> dict[str, list[float]]:
        return {"F": list(self.F), "B": list(self.B), "I": list(self.I), "W": list(self.W)}


def action_costs(profile: Profile, sizes: Sequence[int], rows: float) -> ActionCosts:
    """Everything the planner charges a layout of ``sizes`` at ``rows`` rows per micro-batch."""
    table = stage_costs(profile, sizes, rows)
    return ActionCosts(*(tuple(table[k]) for k in "FBIW"), tuple(stage_updates(profile, sizes)),
                       tuple(stage_stashes(profile, sizes)), message_time(profile, sizes, rows))


def with_updates(events: Sequence, n_ranks: int, placement: Sequence[int], updates: Sequence[float],
                 makespan: float) -> float:
    """A synchronous step with its optimizer step: each rank steps its stages' parameters once
    it has run its last action, so the step ends at ``max over ranks (last end + its updates)``.
    ``events``: the simulator's (rank, action, start, end)."""
    ends = [0.0] * n_ranks
    for event in events:
        ends[event.rank] = max(ends[event.rank], event.end)
    per_rank = [0.0] * n_ranks
    for stage, rank in enumerate(placement):
        per_rank[rank] += updates[stage]
    return max([makespan] + [end + update for end, update in zip(ends, per_rank)])


def boundary_bytes(profile: Profile, sizes: Sequence[int], rows: float) -> list[float]:
    """Bytes each stage but the last sends forward (and receives back as a gradient)."""
    return [profile.blocks[blocks[-1]].output_bytes_per_row * rows for blocks in stage_ranges(sizes)[:-1]]


def message_time(profile: Profile, sizes: Sequence[int], rows: float) -> float:
    """The slowest boundary's message time (the simulator takes one value for every link)."""
    latency = 0.0 if profile.action_overhead_s > 0 else profile.link.latency_s
    return max((latency + n / profile.link.bandwidth_bytes_s for n in boundary_bytes(profile, sizes, rows)),
               default=0.0)


def compute_slots(profile: Profile, n_ranks: int) -> float:
    """How many ranks can compute at full speed at once: ``cores / threads per rank`` (inf when
    the profile does not know the cores)."""
    if profile.cores <= 0:
        return float("inf")
    threads = max(1, profile.cores // n_ranks)
    return profile.cores / threads


def shared_core_makespan(program: Schedule, costs: dict[str, Sequence[float]], comm: float, slots: float) -> float:
    """Step time of ``program`` when at most ``slots`` actions run at full speed at once: the
    actions running at a moment share the cores equally (processor sharing). Otherwise the
    simulator's rules: each rank runs its actions in order, an action waits for its input message,
    a message between ranks arrives ``comm`` after the action that sends it."""
    n_stages, training = program.n_stages, program.is_training
    position = [0] * program.n_ranks
    running: dict[int, list] = {}  # rank -> [action, remaining seconds at full speed]
    arrival: dict[Message, float] = {}
    upcoming: list[float] = []  # a heap of the arrival times still ahead
    now, eps = 0.0, 1e-12
    while True:
        while upcoming and upcoming[0] <= now + eps:
            heapq.heappop(upcoming)
        for rank, actions in enumerate(program.ranks):
            if rank in running or position[rank] >= len(actions):
                continue
            action = actions[position[rank]]
            needed = required_message(action, n_stages)
            if needed is None or arrival.get(needed, float("inf")) <= now + eps:
                running[rank] = [action, costs[action.kind][action.stage]]
        if not running:
            if all(position[r] >= len(a) for r, a in enumerate(program.ranks)):
                return now
            if not upcoming:
                raise RuntimeError("the program deadlocks")  # validate() rules this out for real programs
            now = upcoming[0]
            continue
        speed = min(1.0, slots / len(running))
        step = min(remaining for _, remaining in running.values()) / speed
        if upcoming:
            step = min(step, upcoming[0] - now)
        now += step
        for rank in list(running):
            running[rank][1] -= step * speed
            if running[rank][1] <= eps:
                action = running.pop(rank)[0]
                position[rank] += 1
                message = outgoing(action, n_stages, training)
                if message is not None:
                    same = program.placement[message.target_stage] == rank
                    arrival[message] = now + (0.0 if same else comm)
                    heapq.heappush(upcoming, arrival[message])


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at its peak."""

    weights: float       # all weight versions kept
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


def weight_versions(schedule: str, stage: int, n_stages: int) -> int:
    """Copies of a stage's weights a schedule keeps: PipeDream stashes one per micro-batch in
    flight (``n_stages - stage``), 2BW two, the synchronous schedules one."""
    if schedule == "pipedream":
        return n_stages - stage
    if schedule == "pipedream-2bw":
        return 2
    return 1


def rank_memory(profile: Profile, sizes: Sequence[int], placement: Sequence[int], rows: float,
                peak_microbatches: Sequence[int], schedule: str, optimizer_factor: float = 2.0,
                n_ranks: int | None = None) -> list[MemoryEstimate]:
    """Peak bytes per rank (see the module docstring). ``peak_microbatches[s]``: the most
    micro-batches stage ``s`` keeps activations for at once."""
    n_ranks = n_ranks or max(placement) + 1
    totals = [[0.0, 0.0, 0.0, 0.0] for _ in range(n_ranks)]
    for stage, blocks in enumerate(stage_ranges(sizes)):
        params = float(sum(profile.blocks[b].param_bytes for b in blocks))
        activations = sum(profile.blocks[b].activation_bytes_per_row for b in blocks) * rows
        entry = totals[placement[stage]]
        entry[0] += params * weight_versions(schedule, stage, len(sizes))
        entry[1] += params
        entry[2] += params * optimizer_factor
        entry[3] += activations * peak_microbatches[stage]
    return [MemoryEstimate(*entry) for entry in totals]


# --- asynchronous schedules: an analytic model ----------------------------------------------------
# PipeDream and 2BW are priced by their steady state in closed form: the simulator agrees on a
# long stream (tests/test_async_schedules.py), and the closed form costs nothing to evaluate.
@dataclass(frozen=True)
class AsyncEstimate:
    seconds_per_microbatch: float
    bottleneck: int          # the stage that sets the pace
    stage_seconds: tuple[float, ...]  # per stage, per micro-batch, after dividing by its replicas


def async_steady_state(profile: Profile, sizes: Sequence[int], rows: float, replicas: Sequence[int],
                       schedule: str, slots: float = float("inf")) -> AsyncEstimate:
    """PipeDream-style pipelines never flush: in steady state a micro-batch completes every
    ``max_s t_s`` seconds, where ``t_s = (F_s + B_s + comm_s) / r_s + (U_s + copy_s + sync_s) /
    (r_s window)``; ``comm_s`` is the time to send stage ``s``'s output and its input gradient;
    every update (each micro-batch for PipeDream, each ``n_stages`` for 2BW: ``window``) steps the
    optimizer (``U_s``) and copies the weights into a new version (``copy_s``); a stage with
    ``r_s > 1`` replicas also all-reduces its gradients then (ring: ``2 (r-1)/r * params /
    bandwidth``), each replica updating for its share of the micro-batches. With shared cores
    the pace is at least the total work over ``slots``."""
    costs = action_costs(profile, sizes, rows)
    sent = boundary_bytes(profile, sizes, rows)
    window = 1 if schedule == "pipedream" else len(sizes)
    per_stage: list[float] = []
    work = 0.0
    for stage, blocks in enumerate(stage_ranges(sizes)):
        comm = (profile.link.time(sent[stage]) if stage < len(sizes) - 1 else 0.0) + \
               (profile.link.time(sent[stage - 1]) if stage > 0 else 0.0)
        r = replicas[stage]
        params = sum(profile.blocks[b].param_bytes for b in blocks)
        sync = 0.0 if r == 1 else profile.link.latency_s + 2 * (r - 1) / r * params / profile.link.bandwidth_bytes_s
        update = costs.U[stage] + costs.stash[stage]
        per_stage.append((costs.F[stage] + costs.B[stage] + comm) / r + (update + sync) / (r * window))
        work += costs.F[stage] + costs.B[stage] + update / window
    pace = max(per_stage)
    return AsyncEstimate(max(pace, work / slots), per_stage.index(pace), tuple(per_stage))
