"""Interleaved 1F1B: each rank holds ``v`` model chunks (virtual stages), looped over the ranks
(Narayanan et al., 2021; Megatron-LM).

Rank ``r`` of ``p`` holds stages ``r, r + p, r + 2p, ...``. Micro-batches go through a rank's
chunks in groups of ``p``: forwards of micro-batches 0..p-1 on chunk 0, then on chunk 1, ...,
then the next group; backwards follow the same order with the chunks reversed. Rank ``r`` runs
``2 (p - r - 1) + (v - 1) g`` warm-up forwards (``g = p`` when ``p`` divides ``m``), then
alternates one forward with one backward.

2 ranks, 4 stages (v = 2), 4 micro-batches, F = 1 and B = 2 per virtual stage; upper case is
rank ``r``'s first chunk (stage ``r``), lower case its second (stage ``r + p``)::

    rank 0: F0 F1 f0 f1 F2 .. b0 b0 F3 b1 b1 f2 B0 B0 f3 B1 B1 .. b2 b2 .. b3 b3 B2 B2 B3 B3
    rank 1: .. F0 F1 f0 b0 b0 f1 b1 b1 F2 B0 B0 F3 B1 B1 f2 b2 b2 f3 b3 b3 B2 B2 B3 B3 .. ..

The bubble is ``(p - 1) / (v m + p - 1)`` of the step (1F1B's with ``v = 1``), at the price of
``v`` times as many messages. Megatron asks for ``m`` a multiple of ``p``; here any ``m >= p``
works: the first group takes the ``m % p`` extra micro-batches (and the warm-up grows to match),
which keeps the program deadlock-free and the bubble at the same closed form.
"""

from __future__ import annotations

from .actions import BACKWARD, FORWARD, Action, Schedule

__all__ = ["interleaved_1f1b"]


def _check(n_ranks: int, n_stages: int, n_microbatches: int) -> int:
    if n_ranks < 1 or n_stages % n_ranks or n_stages // n_ranks < 2:
        raise ValueError(
            f"interleaved-1f1b places v >= 2 stages on each rank (stage s on rank s % n_ranks), but the "
            f"pipe has {n_stages} stages for {n_ranks} ranks: cut the model into a multiple of {n_ranks} "
            f"stages, at least {2 * n_ranks} (pipeline(..., n_stages={2 * n_ranks})), or use '1f1b' with "
            f"n_stages == n_ranks"
        )
    if n_microbatches < n_ranks:
        raise ValueError(
            f"interleaved-1f1b needs at least as many micro-batches as ranks ({n_ranks}), got "
            f"{n_microbatches}: raise n_microbatches to {n_ranks} or more"
        )
    return n_stages // n_ranks


def _order(n_ranks: int, n_chunks: int, n_microbatches: int) -> list[tuple[int, int]]:
    """``(chunk, micro-batch)`` in forward order: groups of ``p`` micro-batches through every chunk.

    When ``p`` does not divide ``m`` the first group takes the remainder (``p + m % p``
    micro-batches): every group then has at least ``p``, which keeps the program deadlock-free.
    """
    bounds = [0, *range(n_ranks + n_microbatches % n_ranks, n_microbatches + 1, n_ranks)]
    return [
        (chunk, microbatch)
        for first, end in zip(bounds, bounds[1:])
        for chunk in range(n_chunks)
        for microbatch in range(first, end)
    ]


def _rank_program(rank: int, n_ranks: int, n_chunks: int, n_microbatches: int) -> tuple[Action, ...]:
    order = _order(n_ranks, n_chunks, n_microbatches)
    total = len(order)

    def forward(k: int) -> Action:
        chunk, microbatch = order[k]
        return Action(FORWARD, chunk * n_ranks + rank, microbatch)

    def backward(k: int) -> Action:
        chunk, microbatch = order[k]
        return Action(BACKWARD, (n_chunks - 1 - chunk) * n_ranks + rank, microbatch)

    first_group = n_ranks + n_microbatches % n_ranks
    warmup = min(total, 2 * (n_ranks - rank - 1) + (n_chunks - 1) * first_group)
    program = [forward(k) for k in range(warmup)]
    for k in range(total - warmup):
        program += [forward(warmup + k), backward(k)]
    program += [backward(k) for k in range(total - warmup, total)]
    return tuple(program)


def interleaved_1f1b(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """The interleaved 1F1B program: ``n_stages / n_ranks >= 2`` chunks per rank, looped placement."""
    n_chunks = _check(n_ranks, n_stages, n_microbatches)
    ranks = tuple(_rank_program(rank, n_ranks, n_chunks, n_microbatches) for rank in range(n_ranks))
    return Schedule(ranks, n_stages, n_microbatches, name="interleaved-1f1b")
