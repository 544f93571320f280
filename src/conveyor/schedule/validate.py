"""Checks that a program is complete and cannot deadlock, before any process runs it."""

from __future__ import annotations

from .actions import BACKWARD, FORWARD, INPUT_GRAD, UPDATE, WEIGHT_GRAD, Action, Schedule
from .links import outgoing, required_message

__all__ = ["ScheduleError", "validate", "execution_order"]


class ScheduleError(ValueError):
    """A program that is incomplete or would deadlock."""


def _check_complete(schedule: Schedule) -> None:
    training = schedule.is_training
    seen: dict[Action, int] = {}
    for rank, actions in enumerate(schedule.ranks):
        for action in actions:
            if action in seen:
                raise ScheduleError(f"action {action} appears twice (ranks {seen[action]} and {rank})")
            seen[action] = rank
    for stage in range(schedule.n_stages):
        for microbatch in range(schedule.n_microbatches):
            def has(kind: str, stage: int = stage, microbatch: int = microbatch) -> bool:
                return Action(kind, stage, microbatch) in seen

            if not has(FORWARD):
                raise ScheduleError(f"no forward {Action(FORWARD, stage, microbatch)} in the program")
            if not training:
                continue
            split = has(INPUT_GRAD) or has(WEIGHT_GRAD)
            if has(BACKWARD) and split:
                raise ScheduleError(f"stage {stage} micro-batch {microbatch} has both B and I/W")
            if not has(BACKWARD) and not (has(INPUT_GRAD) and has(WEIGHT_GRAD)):
                raise ScheduleError(
                    f"stage {stage} micro-batch {microbatch} has no backward: add "
                    f"{Action(BACKWARD, stage, microbatch)} or both {Action(INPUT_GRAD, stage, microbatch)} "
                    f"and {Action(WEIGHT_GRAD, stage, microbatch)}"
                )


def _local_prerequisite(action: Action, done: set[Action]) -> Action | None:
    """The action of the same stage that must already have run on this rank."""
    if action.kind in (BACKWARD, INPUT_GRAD):
        return Action(FORWARD, action.stage, action.microbatch)
    if action.kind == WEIGHT_GRAD:
        return Action(INPUT_GRAD, action.stage, action.microbatch)
    if action.kind == UPDATE:
        weight_grad = Action(WEIGHT_GRAD, action.stage, action.microbatch)
        return weight_grad if weight_grad in done else Action(BACKWARD, action.stage, action.microbatch)
    return None


def _check_versions(schedule: Schedule) -> None:
    """A forward may only ask for a weight version its stage has already made (one per U), never
    older than an earlier forward's or than the floor an earlier update announced."""
    for rank, actions in enumerate(schedule.ranks):
        updates: dict[int, int] = {}
        newest: dict[int, int] = {}
        for action in actions:
            if action.kind == UPDATE:
                updates[action.stage] = updates.get(action.stage, 0) + 1
                if action.version is not None:
                    newest[action.stage] = max(newest.get(action.stage, 0), action.version)
            elif action.version is not None:
                if action.version > updates.get(action.stage, 0):
                    raise ScheduleError(
                        f"rank {rank} runs {action} after only {updates.get(action.stage, 0)} updates of stage "
                        f"{action.stage}: version {action.version} does not exist yet"
                    )
                if action.version < newest.get(action.stage, 0):
                    raise ScheduleError(f"rank {rank} runs {action} after a forward on a newer version (or an "
                                        "update that dropped it): a stage's forward versions must not decrease")
                newest[action.stage] = action.version


def _check_pairs(schedule: Schedule) -> None:
    """An F&B pair is a forward followed, on the same rank, by the backward (B or I) of another
    (stage, micro-batch), in a synchronous program."""
    for rank, actions in enumerate(schedule.ranks):
        for position, action in enumerate(actions):
            if not action.overlaps_next:
                continue
            partner = actions[position + 1] if position + 1 < len(actions) else None
            if partner is None or partner.kind not in (BACKWARD, INPUT_GRAD):
                raise ScheduleError(f"rank {rank}: the F&B pair opened by {action} has no backward after it (it "
                                    f"is followed by {partner or 'nothing'}): pair a forward with a B or an I")
            if (partner.stage, partner.microbatch) == (action.stage, action.microbatch):
                raise ScheduleError(f"rank {rank}: {action}&{partner} pairs a micro-batch's forward with its own "
                                    "backward, which needs the forward first: pair it with another micro-batch")
            if schedule.stream is not None:
                raise ScheduleError(f"rank {rank}: {action}&{partner}: F&B pairs are for synchronous programs; "
                                    f"{schedule.name!r} updates weights inside the pipeline")


def execution_order(schedule: Schedule) -> list[tuple[int, Action]]:
    """Run the program with unbounded buffers; return the ``(rank, action)`` order of a legal run.

    Raises :class:`ScheduleError` naming every blocked rank if the program deadlocks or an action
    runs before the action of its own stage that it needs.
    """
    _check_complete(schedule)
    _check_versions(schedule)
    _check_pairs(schedule)
    cursor = [0] * schedule.n_ranks
    updates = [0] * schedule.n_ranks  # U actions each rank has run (replicas update together)
    done: set[Action] = set()
    delivered: set = set()
    order: list[tuple[int, Action]] = []

    def run(rank: int, action: Action) -> None:
        done.add(action)
        order.append((rank, action))
        message = outgoing(action, schedule.n_stages, schedule.is_training)
        if message is not None:
            delivered.add(message)
        if action.kind == UPDATE:
            updates[rank] += 1
        cursor[rank] += 1

    def replicas_ready(action: Action) -> list[int] | None:
        """The replicas of a replicated update, if all of them have reached the same update."""
        group = schedule.replicas[action.stage]
        for other in group:
            at = schedule.ranks[other][cursor[other]] if cursor[other] < len(schedule.ranks[other]) else None
            if at is None or at.kind != UPDATE or at.stage != action.stage or updates[other] != updates[group[0]]:
                return None
        return list(group)

    progress = True
    while progress:
        progress = False
        for rank, actions in enumerate(schedule.ranks):
            while cursor[rank] < len(actions):
                action = actions[cursor[rank]]
                prerequisite = _local_prerequisite(action, done)
                if prerequisite is not None and prerequisite not in done:
                    raise ScheduleError(
                        f"rank {rank} runs {action} before {prerequisite}: a stage's backward must "
                        "follow its forward (W must follow I, U the backward) on the same rank"
                    )
                needed = required_message(action, schedule.n_stages)
                if needed is not None and needed not in delivered:
                    break
                if action.overlaps_next:  # a pair starts once both of its inputs are there
                    partner = actions[cursor[rank] + 1]
                    needed = required_message(partner, schedule.n_stages)
                    if needed is not None and needed not in delivered:
                        break
                    first = _local_prerequisite(partner, done)
                    if first is not None and first not in done:
                        raise ScheduleError(f"rank {rank} runs {action}&{partner} before {first}: a stage's "
                                            "backward must follow its forward on the same rank")
                    run(rank, action)
                    run(rank, partner)
                    progress = True
                    continue
                if action.kind == UPDATE and len(schedule.replicas[action.stage]) > 1:
                    group = replicas_ready(action)
                    if group is None:
                        break
                    for member in group:
                        run(member, schedule.ranks[member][cursor[member]])
                else:
                    run(rank, action)
                progress = True
    blocked = [_waits(schedule, rank, actions, cursor[rank], delivered)
               for rank, actions in enumerate(schedule.ranks) if cursor[rank] < len(actions)]
    if blocked:
        raise ScheduleError("the program deadlocks: " + "; ".join(blocked))
    return order


def _waits(schedule: Schedule, rank: int, actions: tuple[Action, ...], at: int, delivered: set) -> str:
    action = actions[at]
    needed = required_message(action, schedule.n_stages)
    if action.overlaps_next and (needed is None or needed in delivered):
        partner = actions[at + 1]
        return (f"rank {rank} waits at the pair {action}&{partner} for "
                f"{required_message(partner, schedule.n_stages)} (a pair needs both inputs before it starts)")
    return f"rank {rank} waits at {action} for {needed or 'the other replicas of its stage'}"


def validate(schedule: Schedule) -> Schedule:
    """Raise :class:`ScheduleError` unless ``schedule`` is complete and deadlock-free."""
    execution_order(schedule)
    return schedule
