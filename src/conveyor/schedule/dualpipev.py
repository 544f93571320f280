"""DualPipeV: DeepSeek-V3's DualPipe "cut in half" to one V (DeepSeek-AI, 2024; the DualPipe
repository's ``dualpipev.py``).

Rank ``r`` of ``p`` holds stage ``r`` (chunk 0, down the V) and stage ``2p - 1 - r`` (chunk 1, back
up). The program runs in eight phases per rank; in the main phase each step pairs the forward of
one chunk with the backward of the other ("F&B"), which DualPipe runs overlapped so that one
chunk's communication (an expert all-to-all) hides under the other's compute. Here a pair is two
adjacent actions, the forward first (:meth:`_RankProgram.pair` marks every place);
``pair_overlapping(program)`` (pairs.py) joins them into the IR's F&B pairs where that stays
legal and does not lengthen the simulated step. Some backwards are split
(``I`` now, ``W`` later, taken first in first out), as DualPipe's ``enable_zb``.

2 ranks, 4 stages, 4 micro-batches, in program order; ``[..]`` marks a pair::

    rank 0: 0F0 0F1 0F2 3F0 3I0 3W0 3F1 [0F3 3B1] [3F2 0B0] 3B2 [3F3 0B1] 3B3 0I2 0W2 0I3 0W3
    rank 1: 1F0 2F0 1F1 2F1 1F2 2B0 [2F2 1B0] [1F3 2B1] [2F3 1B1] 2B2 1B2 2I3 1I3 2W3 1W3

(docs/schedules.md draws it in time). With ``F = I = W = 1`` per stage and a pair priced
``F + B``, each rank idles at most ``(p - 1)(F&B + B - 3W) = 2 (p - 1)`` (``p - 1`` here):
DualPipe's ``(PP/2 - 1)(F&B + B - 3W)`` with ``PP = 2p`` stages; each rank holds up to ``PP + 1
= 2p + 1`` (stage, micro-batch) activations. It needs ``m >= 2p`` micro-batches.
"""

from __future__ import annotations

from collections import deque

from .actions import BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action, Schedule
from .checks import v_placement

__all__ = ["dualpipev", "minimum_microbatches"]


def minimum_microbatches(n_ranks: int) -> int:
    """DualPipeV's least micro-batch count on ``n_ranks`` ranks: ``2p``."""
    return 2 * n_ranks


class _RankProgram:
    """One rank's action list, with a counter per (kind, stage) and DualPipe's queue of deferred W."""

    def __init__(self, down: int, up: int) -> None:
        self.down, self.up = down, up
        self.actions: list[Action] = []
        self.next: dict[tuple[str, int], int] = {}
        self.deferred: deque[Action] = deque()

    def _take(self, kind: str, stage: int) -> int:
        microbatch = self.next.get((kind, stage), 0)
        self.next[kind, stage] = microbatch + 1
        return microbatch

    def forward(self, stage: int) -> None:
        self.actions.append(Action(FORWARD, stage, self._take(FORWARD, stage)))

    def backward(self, stage: int, split: bool = False) -> None:
        """A full backward, or (``split``) its ``I`` now and its ``W`` queued for :meth:`weight`."""
        microbatch = self._take(BACKWARD, stage)
        if not split:
            self.actions.append(Action(BACKWARD, stage, microbatch))
            return
        self.actions.append(Action(INPUT_GRAD, stage, microbatch))
        self.deferred.append(Action(WEIGHT_GRAD, stage, microbatch))

    def weight(self) -> None:
        self.actions.append(self.deferred.popleft())

    def pair(self, forward_stage: int, backward_stage: int) -> None:
        """F&B: the forward of one chunk and the backward of the other, issued together.

        Two adjacent actions, forward first, as the runtime's unpaired order; ``pair_overlapping``
        joins them into an F&B pair (``Action.paired``) for the runtime to overlap."""
        self.forward(forward_stage)
        self.backward(backward_stage)


def _rank_program(rank: int, n_ranks: int, n_microbatches: int) -> tuple[Action, ...]:
    p, m = n_ranks, n_microbatches
    program = _RankProgram(rank, 2 * p - 1 - rank)
    down, up = program.down, program.up
    for _ in range(2 * (p - rank - 1)):  # 1. nF0: warm-up down the V
        program.forward(down)
    for _ in range(rank + 1):  # 2. nF0F1
        program.forward(down)
        program.forward(up)
    for _ in range(p - rank - 1):  # 3. nB1W1F1: the first backwards of chunk 1, split, W at once
        program.backward(up, split=True)
        program.weight()
        program.forward(up)
    for step in range(m - 2 * p + rank + 1):  # 4. main: nF0B1F1B0, two pairs a step
        if step == 0 and rank == p - 1:  # the bottom of the V: DualPipe runs these two unpaired
            program.forward(down)
            program.backward(up)
        else:
            program.pair(down, up)
        program.pair(up, down)
    for _ in range(p - rank - 1):  # 5. nB1F1B0
        program.backward(up)
        program.pair(up, down)
    split = False
    for step in range(rank + 1):  # 6. nB1B0: the second half of these backwards split
        split = split or (step == (rank + 1) // 2 and rank % 2 == 1)
        program.backward(up, split=split)
        split = split or (step == (rank + 1) // 2 and rank % 2 == 0)
        program.backward(down, split=split)
    for _ in range(p - rank - 1):  # 7. nWB0
        program.weight()
        program.backward(down, split=True)
    while program.deferred:  # 8. nW: the deferred weight gradients
        program.weight()
    return tuple(program.actions)


def dualpipev(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """DualPipeV: two stages per rank in a V, forward/backward pairs in the steady state; ``m >= 2p``."""
    placement = v_placement("dualpipev", n_ranks, n_stages)
    least = minimum_microbatches(n_ranks)
    if n_microbatches < least:
        raise ValueError(
            f"dualpipev needs at least 2 x {n_ranks} ranks = {least} micro-batches, got {n_microbatches}: raise "
            f"n_microbatches to {least} or more, or use 'zb-v' (same placement, any number of micro-batches)"
        )
    ranks = tuple(_rank_program(rank, n_ranks, n_microbatches) for rank in range(n_ranks))
    return Schedule(ranks, n_stages, n_microbatches, placement, name="dualpipev")
