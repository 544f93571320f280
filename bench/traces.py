"""What a step's sleep records say: a timeline, the program that ran, and message latency.

The records come from the sleeping stages (``sleep_stages``): ``(stage, kind, start, end)`` of
every sleep of one step, in the order the sleeps happened. Both libraries run the same stage
modules, so these compare like with like; time outside the sleeps is the runtime's (or waiting).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .sleep_stages import Record

__all__ = ["Row", "exposed_latency", "rows", "traced_program"]

Row = tuple[int, str, float, float]  # (rank, "<stage><kind><micro-batch>", start, end)


def rows(records: Sequence[Record], n_ranks: int, placement: Sequence[int] | None = None) -> list[Row]:
    """Records as timeline rows; the micro-batch of the k-th (stage, kind) sleep is k (every
    schedule here runs a stage's forwards, and its backwards, in micro-batch order); stage ``s``
    runs on rank ``placement[s]`` (default ``s % n_ranks``)."""
    seen: dict[tuple[int, str], int] = {}
    result = []
    for stage, kind, start, end in sorted(records, key=lambda r: r[2]):
        microbatch = seen.get((stage, kind), 0)
        seen[(stage, kind)] = microbatch + 1
        rank = placement[stage] if placement is not None else stage % n_ranks
        result.append((rank, f"{stage}{kind}{microbatch}", start, end))
    return result


def _parse(text: str) -> tuple[int, str, int]:
    for i, char in enumerate(text):
        if char.isalpha():
            return int(text[:i]), char, int(text[i + 1:])
    raise ValueError(text)


def exposed_latency(timeline: Sequence[Row], n_stages: int) -> list[float]:
    """Per cross-rank dependency whose consumer sat idle waiting for it: consumer start - producer end.

    Dependencies: F of stage s on F of s - 1; B (or I) of stage s on B (or I) of s + 1, for the
    same micro-batch. That gap is the message's exposed latency plus the runtime's work between
    two computations (send, receive, decode, autograd bookkeeping).
    """
    by_key = {_parse(text): (rank, start, end) for rank, text, start, end in timeline}
    per_rank: dict[int, list[tuple[float, float]]] = {}
    for rank, _, start, end in timeline:
        per_rank.setdefault(rank, []).append((start, end))
    latencies = []
    for (stage, kind, microbatch), (rank, start, _) in by_key.items():
        source = stage - 1 if kind == "F" else stage + 1 if kind in ("B", "I") else None
        if source is None or not 0 <= source < n_stages:
            continue
        producer = by_key.get((source, kind, microbatch))
        if producer is None or producer[0] == rank:
            continue
        previous_end = max((e for s, e in per_rank[rank] if e <= start), default=float("-inf"))
        if previous_end <= producer[2] <= start:
            latencies.append(start - producer[2])
    return latencies


def median_or_nan(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def traced_program(timeline: Sequence[Row], n_stages: int, n_microbatches: int) -> Any:
    """The program that ran, read off a step's timeline (actions per rank in start order), as a
    conveyor ``Schedule`` the simulator can time; None if it is not a whole step. A stage input
    that needs no gradient leaves no I sleep: such I actions are put back right before their W.

    (torch's ``pipeline_order`` is not used: for its single-stage schedules it is a drawing,
    not what ``step`` runs.)
    """
    from conveyor.schedule import Schedule
    from conveyor.schedule.actions import Action

    n_ranks = 1 + max((row[0] for row in timeline), default=-1)
    per_rank: list[list[Action]] = [[] for _ in range(n_ranks)]
    kinds = {_parse(text)[1] for _, text, _, _ in timeline}
    for rank, text, _, _ in sorted(timeline, key=lambda r: r[2]):
        stage, kind, microbatch = _parse(text)
        if kind == "W" and "I" in kinds and stage == 0:
            per_rank[rank].append(Action("I", stage, microbatch))
        per_rank[rank].append(Action(kind, stage, microbatch))
    try:
        return Schedule(tuple(tuple(actions) for actions in per_rank), n_stages, n_microbatches,
                        tuple(s % n_ranks for s in range(n_stages)), name="traced")
    except ValueError:
        return None
