"""Each action of a rank's program with its messages resolved: what it receives from which rank
and what it sends to which, worked out once per program instead of at every action."""

from __future__ import annotations

from dataclasses import dataclass

from ..schedule import Schedule
from ..schedule.actions import Action
from ..schedule.links import Message, outgoing, required_message

__all__ = ["Step", "step_of", "steps_of"]


@dataclass(frozen=True, slots=True)
class Step:
    """``action`` and its messages: ``receives`` from rank ``source``, ``sends`` to rank
    ``destination`` (None and -1 where there is none). ``text`` is ``str(action)``, for traces.
    An F&B pair is one step whose ``pair`` holds its forward's and its backward's steps."""

    action: Action
    text: str
    receives: Message | None
    source: int
    sends: Message | None
    destination: int
    pair: tuple[Step, Step] | None = None


def step_of(action: Action, program: Schedule) -> Step:
    """The :class:`Step` of one action of ``program``."""
    receives = required_message(action, program.n_stages)
    sends = outgoing(action, program.n_stages, program.is_training)
    return Step(action, str(action), receives,
                program.rank_of(receives.stage, receives.microbatch) if receives is not None else -1,
                sends, program.rank_of(sends.target_stage, sends.microbatch) if sends is not None else -1)


def steps_of(program: Schedule, rank: int) -> list[Step]:
    """The steps of ``rank``'s actions in ``program``, in order; an F&B pair is one step."""
    steps: list[Step] = []
    opened: Step | None = None
    for action in program.ranks[rank]:
        step = step_of(action, program)
        if opened is not None:
            steps.append(Step(opened.action, f"{opened.text}&{step.text}", None, -1, None, -1, (opened, step)))
            opened = None
        elif action.overlaps_next:
            opened = step
        else:
            steps.append(step)
    return steps
