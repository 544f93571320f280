"""V-shape schedules with controllable activation memory (Qi et al., "Pipeline Parallelism with
Controllable Memory", 2024): V-Min and V-Half. Rank ``r`` of ``p`` holds stage ``r`` (down the V)
and stage ``2p - 1 - r`` (back up); every backward is split into ``I`` and ``W``.

Memory is counted as in :func:`simulate`'s ``rank_peak_activations``: one micro-batch on one
(half-size) stage counts 1, live from its ``F`` to the end of its ``W``; 1F1B's rank 0 holds ``p``
full-size micro-batches, ``2p`` in these units.

**The building block.** One micro-batch's passes on every stage, placed on a grid of unit slots
(``F = I = W = 1``): forwards one slot apart down and up the V, then the input gradients one slot
apart back, each ``W`` in the first free slot after its ``I``, no two passes of one rank in the
same slot modulo 6 (a rank runs 6 passes per micro-batch). Repeating the block every 6 slots
packs every rank's steady state with no idle slot; a micro-batch's lifespan on a stage (``F`` to
``W``) fixes how many are live at once: about ``(4p + 2) / 6`` per rank, ``2 ((p + 4) // 3)`` in
these units, a third of 1F1B's. The program is the block's order, squeezed: where a rank would
wait, it runs a later forward that is ready and fits in the memory budget, or a ``W`` that is due.

* ``v-min``: the block at its own memory, ``2 ((p + 4) // 3)``; each rank idles at most ``4p``
  slots (the paper's bubble ``~ 2p / 3m``: ``(2p/3)(F + B + W)`` of full-size stages).
* ``v-half``: budget ``2 ((p + 2) // 2)`` (half of 1F1B's). The extra memory is spent in the warm-up
  and the tail, where a rank of the block waits: the program is the shortest of the squeezed block
  and a list schedule under that budget (gradients first, or forwards first). The paper's bubble
  ``~ p / 2m`` is ``3p`` slots per rank: met for every ``p`` from 2 to 8 but 7, where it idles
  23 (V-Min's) against 21, see docs/schedules.md.
* The paper's V-ZB (budget ``2p``, zero bubble) has the figures of our ``zb-v``: ``2p`` live and
  ``p - 1`` idle slots per rank, the least a synchronised step allows; ``v-zb`` names it.

Every program is a legal run of a unit-cost list schedule, so it validates by construction; its
peak is the budget's by construction too (the order alone fixes a rank's live count).
"""

from __future__ import annotations

from collections.abc import Callable

from .actions import FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action, Schedule
from .checks import v_placement
from .links import Message, outgoing, required_message

__all__ = ["v_min", "v_half", "v_min_budget", "v_half_budget"]

PERIOD = 6  # passes per micro-batch on a rank: F, I, W on each of its two stages


def v_min_budget(n_ranks: int) -> int:
    """V-Min's live (stage, micro-batch) activations per rank: ``2 ((p + 4) // 3)``."""
    return 2 * ((n_ranks + 4) // 3)


def v_half_budget(n_ranks: int) -> int:
    """V-Half's live (stage, micro-batch) activations per rank: ``2 ((p + 2) // 2)``."""
    return 2 * ((n_ranks + 2) // 2)


def _rank(stage: int, n_ranks: int) -> int:
    return stage if stage < n_ranks else 2 * n_ranks - 1 - stage


def _block(n_ranks: int) -> dict[tuple[str, int], int]:
    """Slot of each pass of micro-batch 0: ``(kind, stage) -> slot``."""
    p = n_ranks
    taken: dict[int, set[int]] = {rank: set() for rank in range(p)}
    slots: dict[tuple[str, int], int] = {}

    def place(kind: str, stage: int, earliest: int) -> int:
        slot = earliest
        while slot % PERIOD in taken[_rank(stage, p)]:
            slot += 1
        taken[_rank(stage, p)].add(slot % PERIOD)
        slots[kind, stage] = slot
        return slot

    for stage in range(2 * p):  # down the V and back up, one slot apart
        place(FORWARD, stage, stage)
    previous = slots[FORWARD, 2 * p - 1]
    for stage in reversed(range(2 * p)):  # the input gradients back, as early as the grid allows
        previous = place(INPUT_GRAD, stage, previous + 1)
    for stage in reversed(range(2 * p)):
        place(WEIGHT_GRAD, stage, slots[INPUT_GRAD, stage] + 1)
    return slots


def _block_order(n_ranks: int, n_microbatches: int) -> list[list[Action]]:
    """Each rank's actions in block order: micro-batch ``k``'s pass at its slot + ``6k``."""
    timed: list[list[tuple[int, Action]]] = [[] for _ in range(n_ranks)]
    for (kind, stage), slot in _block(n_ranks).items():
        for microbatch in range(n_microbatches):
            timed[_rank(stage, n_ranks)].append((slot + PERIOD * microbatch, Action(kind, stage, microbatch)))
    return [[action for _, action in sorted(actions, key=lambda item: item[0])] for actions in timed]


class _UnitRun:
    """A unit-cost run of per-rank programs being built: what has run, when messages arrive."""

    def __init__(self, n_ranks: int) -> None:
        self.n_stages = 2 * n_ranks
        self.arrival: dict[Message, int] = {}
        self.done: set[Action] = set()
        self.free = [0] * n_ranks
        self.live = [0] * n_ranks
        self.programs: list[list[Action]] = [[] for _ in range(n_ranks)]

    def ready(self, action: Action) -> int | None:
        """When ``action`` could start as far as its inputs go (None: not yet known)."""
        if action.kind == INPUT_GRAD and Action(FORWARD, action.stage, action.microbatch) not in self.done:
            return None
        if action.kind == WEIGHT_GRAD and Action(INPUT_GRAD, action.stage, action.microbatch) not in self.done:
            return None
        needed = required_message(action, self.n_stages)
        return 0 if needed is None else self.arrival.get(needed)

    def run(self, rank: int, action: Action, start: int) -> None:
        self.free[rank] = start + 1
        self.done.add(action)
        self.programs[rank].append(action)
        self.live[rank] += {FORWARD: 1, WEIGHT_GRAD: -1}.get(action.kind, 0)
        message = outgoing(action, self.n_stages)
        if message is not None:
            self.arrival[message] = start + 1


def _squeeze(order: list[list[Action]], budget: int) -> list[list[Action]]:
    """Run ``order`` with unit costs; a rank that would wait runs a later ready forward (if its
    live count stays within ``budget`` until that forward's place) or a due ``W`` instead."""
    run = _UnitRun(len(order))
    pending = [list(actions) for actions in order]
    never = float("inf")
    while any(pending):
        best: tuple[float, int, int] = (never, 0, 0)
        for rank, actions in enumerate(pending):
            if not actions:
                continue
            free = run.free[rank]
            head = run.ready(actions[0])
            head_start = never if head is None else max(free, head)
            choice = (head_start, rank, 0)
            if head_start > free:
                live, peak_before = run.live[rank], 0
                for index, action in enumerate(actions):
                    live += action.kind == FORWARD
                    if index and action.kind == FORWARD and peak_before + 1 <= budget:
                        at = run.ready(action)
                        if at is not None and max(free, at) < choice[0]:
                            choice = (max(free, at), rank, index)
                    elif index and action.kind == WEIGHT_GRAD and run.ready(action) is not None:
                        choice = min(choice, (free, rank, index))
                    peak_before = max(peak_before, live)
                    live -= action.kind == WEIGHT_GRAD
            best = min(best, choice)
        start, rank, index = best
        if start == never:  # cannot happen for a block order; a guard against a silent hang
            raise RuntimeError("the V schedule's list scheduler found no runnable action")
        run.run(rank, pending[rank].pop(index), int(start))
    return run.programs


def _bounded_list_schedule(n_ranks: int, n_microbatches: int, budget: int,
                           gradients_first: bool) -> list[list[Action]]:
    """Each free rank runs a ready action: an ``I`` or a forward (in the order ``gradients_first``
    says), else a ``W``. A forward down the V admits a new micro-batch only while the rank's live
    count, plus one slot kept for each admitted micro-batch still to come back up, leaves room for
    it and its own way back; a forward up the V always has its slot."""
    p, m = n_ranks, n_microbatches
    run = _UnitRun(p)
    next_of = {(kind, stage): 0 for kind in (FORWARD, INPUT_GRAD, WEIGHT_GRAD) for stage in range(2 * p)}
    coming_back = [0] * p
    kinds = (INPUT_GRAD, FORWARD, WEIGHT_GRAD) if gradients_first else (FORWARD, INPUT_GRAD, WEIGHT_GRAD)
    remaining, now = 6 * p * m, 0
    while remaining:
        for rank in range(p):
            if run.free[rank] > now:
                continue
            down, up = rank, 2 * p - 1 - rank
            for kind in kinds:
                chosen = None
                for stage in (up, down):
                    microbatch = next_of[kind, stage]
                    if microbatch >= m:
                        continue
                    action = Action(kind, stage, microbatch)
                    at = run.ready(action)
                    if at is None or at > now:
                        continue
                    if kind == FORWARD and stage == down and run.live[rank] + coming_back[rank] + 2 > budget:
                        continue
                    chosen = action
                    break
                if chosen is not None:
                    break
            if chosen is None:
                continue
            next_of[chosen.kind, chosen.stage] += 1
            if chosen.kind == FORWARD and down != up:
                coming_back[rank] += 1 if chosen.stage == down else -1
            run.run(rank, chosen, now)
            remaining -= 1
        now += 1
        if now > 100 * (remaining + p * m):  # a guard: every admitted micro-batch can always finish
            raise RuntimeError(f"the bounded V list schedule stalled with budget {budget}")
    return run.programs


def _makespan(programs: list[list[Action]]) -> int:
    """Unit-cost makespan of per-rank programs (each action as soon as its rank and input allow)."""
    run = _UnitRun(len(programs))
    cursor = [0] * len(programs)
    progressed = True
    while progressed:
        progressed = False
        for rank, actions in enumerate(programs):
            while cursor[rank] < len(actions):
                at = run.ready(actions[cursor[rank]])
                if at is None:
                    break
                run.run(rank, actions[cursor[rank]], max(run.free[rank], at))
                run.programs[rank].pop()  # only the timing is wanted
                cursor[rank] += 1
                progressed = True
    return max(run.free)


def _schedule(name: str, n_ranks: int, n_stages: int, n_microbatches: int,
              candidates: list[Callable[[], list[list[Action]]]]) -> Schedule:
    placement = v_placement(name, n_ranks, n_stages)
    programs = min((build() for build in candidates), key=_makespan)  # the first of equals wins
    return Schedule(tuple(tuple(actions) for actions in programs), n_stages, n_microbatches, placement, name=name)


def v_min(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """V-Min: the V building block at its least memory, ``2 ((p + 4) // 3)`` live per rank. Any ``m >= 1``."""
    p, m = n_ranks, n_microbatches
    return _schedule("v-min", p, n_stages, m, [lambda: _squeeze(_block_order(p, m), v_min_budget(p))])


def v_half(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """V-Half: at most ``2 ((p + 2) // 2)`` live per rank (half of 1F1B's), the extra over V-Min
    spent on the warm-up and the tail. Any ``m >= 1``."""
    p, m, budget = n_ranks, n_microbatches, v_half_budget(n_ranks)
    return _schedule("v-half", p, n_stages, m, [
        lambda: _squeeze(_block_order(p, m), budget),
        lambda: _bounded_list_schedule(p, m, budget, gradients_first=False),
        lambda: _bounded_list_schedule(p, m, budget, gradients_first=True),
    ])
