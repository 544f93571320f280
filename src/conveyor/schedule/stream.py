"""The 1F1B worker that 1F1B and the asynchronous schedules share, over a stream of
micro-batches whose length need not be known in advance.

A worker is one rank running one stage (a replicated stage has several workers, which take its
micro-batches round robin). It admits ``in_flight - 1`` warm-up forwards, then alternates one
forward with one backward until the stream ends, and drains. Synchronous 1F1B runs it over the
step's micro-batches; the asynchronous schedules run it over the whole stream, with optimizer
updates (U) inside, and never flush between batches. They supply two rules: the weight version
a forward uses, and after which backwards the stage updates. An update names the version the
stage's next forward will use, so the runtime can drop older versions as soon as their
backwards are done.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from .actions import BACKWARD, FORWARD, UPDATE, Action, Schedule
from .checks import in_flight, replica_groups

__all__ = ["VersionRule", "UpdateRule", "worker_actions", "streaming_schedule"]

VersionRule = Callable[[int, int, int], int]
"""``version(stage, microbatch, updates_so_far) -> version`` the forward of ``microbatch`` uses."""

UpdateRule = Callable[[int, bool], bool]
"""``update(microbatch, is_workers_last) -> bool``: whether the worker updates after that backward."""


def worker_actions(stage: int, admitted: int, exists: Callable[[int], bool], *, replica: int = 0,
                   n_replicas: int = 1, version: VersionRule | None = None,
                   update: UpdateRule | None = None) -> Iterator[Action]:
    """The actions of replica ``replica`` of ``stage`` over the micro-batches ``k`` with
    ``exists(k)`` and ``k % n_replicas == replica``, at most ``admitted`` in flight."""
    def microbatch(index: int) -> int:
        return index * n_replicas + replica

    def has(index: int) -> bool:
        return exists(microbatch(index))

    forwarded = backwarded = updates = 0

    def forward() -> Action:
        nonlocal forwarded
        k = microbatch(forwarded)
        forwarded += 1
        return Action(FORWARD, stage, k, None if version is None else version(stage, k, updates))

    while forwarded < admitted - 1 and has(forwarded):
        yield forward()
    while has(backwarded):
        if has(forwarded):
            yield forward()
        k = microbatch(backwarded)
        yield Action(BACKWARD, stage, k)
        if update is not None and update(k, not has(backwarded + 1)):
            updates += 1
            assert version is not None
            floor = version(stage, microbatch(forwarded), updates) if has(forwarded) else updates
            yield Action(UPDATE, stage, k, floor)
        backwarded += 1


def streaming_schedule(name: str, n_ranks: int, n_stages: int, n_microbatches: int, version: VersionRule,
                       update: UpdateRule, replicas: Sequence[int] | None = None,
                       admitted: int | None = None) -> Schedule:
    """A :class:`Schedule` of ``n_microbatches`` whose ``stream`` runs the same rules unbounded.
    ``admitted`` overrides how many micro-batches each input-stage worker has in flight."""
    groups = replica_groups(name, n_ranks, n_stages, replicas)
    if admitted is not None and admitted < 1:
        raise ValueError(f"admitted={admitted}: an input-stage worker needs at least 1 micro-batch in flight")
    for stage, group in enumerate(groups):
        if n_microbatches % len(group):
            raise ValueError(f"stage {stage} has {len(group)} replicas, which must update together, so "
                             f"n_microbatches ({n_microbatches}) must be a multiple of {len(group)}")
    owner = {rank: (stage, group.index(rank), len(group)) for stage, group in enumerate(groups) for rank in group}

    def stream(rank: int, exists: Callable[[int], bool]) -> Iterator[Action]:
        stage, replica, n_replicas = owner[rank]
        limit = admitted if stage == 0 and admitted is not None else in_flight(groups, stage)
        return worker_actions(stage, limit, exists, replica=replica, n_replicas=n_replicas,
                              version=version, update=update)

    ranks = tuple(tuple(stream(rank, lambda k: k < n_microbatches)) for rank in range(n_ranks))
    return Schedule(ranks, n_stages, n_microbatches, name=name, stream=stream, replicas=groups)
