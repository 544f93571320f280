"""Messages implied by a program: who sends what to whom, in which order.

Nothing here is written in the program itself. After ``F`` of stage ``s`` the stage's output
goes to stage ``s + 1``; after ``B`` or ``I`` of stage ``s`` the gradient of its input goes to
stage ``s - 1``. Each rank sends in its own program order, so the receiver can compute, for
every inbound link, the exact sequence of messages to expect: no tags are needed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .actions import FORWARD, Action, Schedule

__all__ = ["Message", "outgoing", "incoming", "incoming_stream", "link_order", "required_message"]

ACTIVATION = "activation"
GRADIENT = "gradient"


@dataclass(frozen=True, slots=True)
class Message:
    """A value crossing a stage boundary: ``kind`` is ``"activation"`` or ``"gradient"``;
    ``stage`` is the stage that produced it."""

    kind: str
    stage: int
    microbatch: int

    @property
    def target_stage(self) -> int:
        return self.stage + 1 if self.kind == ACTIVATION else self.stage - 1


def outgoing(action: Action, n_stages: int, training: bool = True) -> Message | None:
    """The message ``action`` produces, or None (last-stage forward, first-stage backward, W)."""
    if action.kind == FORWARD:
        return Message(ACTIVATION, action.stage, action.microbatch) if action.stage + 1 < n_stages else None
    if action.sends_gradient and action.stage > 0 and training:
        return Message(GRADIENT, action.stage, action.microbatch)
    return None


def required_message(action: Action, n_stages: int) -> Message | None:
    """The message ``action`` must receive before it can run, or None."""
    if action.kind == FORWARD:
        return Message(ACTIVATION, action.stage - 1, action.microbatch) if action.stage > 0 else None
    if action.sends_gradient and action.stage + 1 < n_stages:
        return Message(GRADIENT, action.stage + 1, action.microbatch)
    return None


def link_order(schedule: Schedule) -> dict[tuple[int, int], list[Message]]:
    """For every link ``(source rank, destination rank)``, the messages in sending order.

    Links from a rank to itself (adjacent stages on one rank) are included; the runtime hands
    those over in memory.
    """
    training = schedule.is_training
    links: dict[tuple[int, int], list[Message]] = {}
    for rank, actions in enumerate(schedule.ranks):
        for action in actions:
            message = outgoing(action, schedule.n_stages, training)
            if message is not None:
                destination = schedule.rank_of(message.target_stage, message.microbatch)
                links.setdefault((rank, destination), []).append(message)
    return links


def incoming(schedule: Schedule, rank: int) -> dict[int, list[Message]]:
    """For ``rank``: every other rank it receives from, with the messages in arrival order."""
    return {
        source: messages
        for (source, destination), messages in link_order(schedule).items()
        if destination == rank and source != rank
    }


def incoming_stream(schedule: Schedule, rank: int, exists: Callable[[int], bool]) -> dict[int, Iterator[Message]]:
    """:func:`incoming` for a streaming schedule: for each neighbour rank, the messages it sends
    ``rank``, generated lazily from its own action stream as the receiver needs them."""
    assert schedule.stream is not None
    mine = set(schedule.stages_of(rank))
    neighbours = {holder for stage in mine for s in (stage - 1, stage + 1) if 0 <= s < schedule.n_stages
                  for holder in schedule.replicas[s]} - {rank}

    def messages_from(source: int) -> Iterator[Message]:
        assert schedule.stream is not None
        for action in schedule.stream(source, exists):
            message = outgoing(action, schedule.n_stages)
            if message is not None and schedule.rank_of(message.target_stage, message.microbatch) == rank:
                yield message

    return {source: messages_from(source) for source in sorted(neighbours)}
