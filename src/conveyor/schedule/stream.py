"""The skeleton the asynchronous schedules share: 1F1B over a stream of micro-batches whose
length is not known in advance, with optimizer updates (U) inside the program.

Stage ``s`` of ``p`` admits ``p - s - 1`` warm-up forwards, then alternates one forward with
one backward until the stream ends, and drains. No flush happens between batches: the stream
only drains once, at its end. Each schedule supplies two rules: the weight version a forward
uses, and after which backwards the stage updates its weights. An update names the version the
stage's next forward will use, so the runtime can drop older versions as soon as their
backwards are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from .actions import BACKWARD, FORWARD, UPDATE, Action, Schedule
from .checks import require_one_stage_per_rank

__all__ = ["VersionRule", "UpdateRule", "stage_stream", "streaming_schedule"]

VersionRule = Callable[[int, int, int], int]
"""``version(stage, microbatch, updates_so_far) -> version`` the forward of ``microbatch`` uses."""

UpdateRule = Callable[[int, bool], bool]
"""``update(microbatch, is_last) -> bool``: whether the stage updates after that backward."""


def stage_stream(stage: int, n_stages: int, exists: Callable[[int], bool], version: VersionRule,
                 update: UpdateRule) -> Iterator[Action]:
    """The actions of ``stage`` over the micro-batches ``k`` for which ``exists(k)``."""
    warmup = n_stages - stage - 1
    forwarded = backwarded = updates = 0

    def forward() -> Action:
        nonlocal forwarded
        action = Action(FORWARD, stage, forwarded, version(stage, forwarded, updates))
        forwarded += 1
        return action

    while forwarded < warmup and exists(forwarded):
        yield forward()
    while exists(backwarded):
        if exists(forwarded):
            yield forward()
        yield Action(BACKWARD, stage, backwarded)
        if update(backwarded, not exists(backwarded + 1)):
            updates += 1
            floor = version(stage, forwarded, updates) if exists(forwarded) else updates
            yield Action(UPDATE, stage, backwarded, floor)
        backwarded += 1


def streaming_schedule(name: str, n_ranks: int, n_stages: int, n_microbatches: int, version: VersionRule,
                       update: UpdateRule) -> Schedule:
    """A :class:`Schedule` of ``n_microbatches`` whose ``stream`` runs the same rules unbounded."""
    require_one_stage_per_rank(name, n_ranks, n_stages)

    def stream(rank: int, exists: Callable[[int], bool]) -> Iterator[Action]:
        return stage_stream(rank, n_stages, exists, version, update)

    ranks = tuple(tuple(stream(stage, lambda k: k < n_microbatches)) for stage in range(n_stages))
    return Schedule(ranks, n_stages, n_microbatches, name=name, stream=stream)
