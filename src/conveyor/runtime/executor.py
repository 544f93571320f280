"""The executor core: runs the actions of one rank's program on that rank's stages.

:class:`PipelineRunner` (one process per rank) and :class:`LocalPipeline` (every rank a lane of
one process) both run each action through :meth:`Executor.run`: dispatch to the stage, anomaly
checks, error wrapping and the trace. They differ only in the :class:`Mover` that carries
boundary values between stages (a transport between processes, a mailbox between lanes) and in
how they reduce over ranks (``entry.py``).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import PipelineError
from ..schedule.actions import BACKWARD, FORWARD, INPUT_GRAD, UPDATE, WEIGHT_GRAD, Action
from ..schedule.links import Message
from .bundle import describe
from .feed import StepData, StreamFeed
from .stage import StageExecutor
from .steps import Step

__all__ = ["Executor", "Mover", "TraceEvent", "require_finite"]

Event = tuple[str, float, float, float]  # (action, start, end, waited)


@dataclass(frozen=True, slots=True)
class TraceEvent:
    """One action as this rank ran it, from the moment its input was available (after any wait
    for a peer) to its end, on ``time.perf_counter()``'s clock, which is system-wide (monotonic)
    on Linux, so events of different ranks on one host line up. ``waited`` is the time spent
    waiting for the input before ``start``."""

    rank: int
    action: str
    start: float
    end: float
    waited: float = 0.0


class Mover(Protocol):
    """How boundary values travel between stages: the transport's own three methods."""

    def receive(self, message: Message, source: int) -> Any:
        """The value of ``message``, sent by rank ``source`` (waiting for it if needed)."""

    def send(self, destination: int, message: Message, value: Any) -> None:
        """Send ``value`` as ``message`` to rank ``destination``."""

    def deliver_local(self, message: Message, value: Any) -> None:
        """Hand ``value`` to a stage of this same rank."""


def require_finite(what: str, tensors: Sequence[torch.Tensor | None]) -> None:
    """Raise ``FloatingPointError`` naming ``what`` if any tensor holds a NaN or infinity."""
    for tensor in tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
            raise FloatingPointError(f"{what} contains {kind} (detect_anomaly=True)")


def _no_update(action: Action) -> None:
    raise RuntimeError(f"{action} needs an optimizer: run asynchronous schedules with stream()")


class Executor:
    """Runs ``rank``'s actions on ``stages`` (indexed by stage), moving values with ``mover``.

    ``update`` steps the optimizer for an ``U`` action; ``accumulated`` counts, per stage with
    stashed weight versions, the backwards since its last update. ``loss_scale`` multiplies the
    last stage's loss (fp16); ``trace`` receives one ``(action, start, end, waited)`` per action.
    ``last_backward`` holds each stage's last gradient-accumulating action of the program, after
    which the stage's data-parallel sync runs (``data_parallel.py``).
    """

    def __init__(self, rank: int, stages: Mapping[int, StageExecutor] | Sequence[StageExecutor], mover: Mover, *,
                 detect_anomaly: bool = False, update: Callable[[Action], None] = _no_update) -> None:
        self.rank = rank
        self.stages = stages
        self.detect_anomaly = detect_anomaly
        self.update = update
        self.loss_scale = 1.0
        self.accumulated: dict[int, int] = {}
        self.trace: list[Event] | deque[Event] = []
        self.last_backward: set[Action] | frozenset[Action] = frozenset()
        self._receive = mover.receive  # bound once: no lookup per action
        self._send = mover.send
        self._deliver_local = mover.deliver_local
        self.ready_at = 0.0  # when the current action's input was available (the watchdog reads it)
        self.current: Step | None = None  # the action running now (None between calls)
        self._backward_thread: ThreadPoolExecutor | None = None  # runs the backward chunk of F&B pairs

    def _received(self, step: Step) -> Any:
        value = self._receive(step.receives, step.source)
        self.ready_at = time.perf_counter()
        return value

    def _pass_on(self, step: Step, value: Any) -> None:
        if step.destination == self.rank:
            self._deliver_local(step.sends, value)
        else:
            self._send(step.destination, step.sends, value)

    def run(self, step: Step, data: StepData | StreamFeed) -> None:
        """Run one action (its receive, compute and send) and append it to :attr:`trace`; a
        failure becomes a :class:`PipelineError` naming rank, stage, micro-batch and action."""
        if step.pair is not None:
            return self._run_pair(step.pair[0], step.pair[1], data)
        began = self.ready_at = time.perf_counter()
        self.current = step
        action = step.action
        stage = self.stages[action.stage]
        microbatch = action.microbatch
        received: Any = None
        try:
            if action.kind == FORWARD:
                if step.receives is None:
                    args, kwargs = data.inputs(microbatch)
                else:
                    received = self._received(step)
                    args, kwargs = (received,), {}
                target, weight = data.target(microbatch) if stage.is_last and data.training else (None, 1.0)
                result = stage.forward(microbatch, args, kwargs, target=target, weight=weight * self.loss_scale,
                                       training=data.training, version=action.version, fresh=received is not None)
                if stage.is_last:
                    if self.detect_anomaly and data.training:
                        require_finite("the loss", [result])
                    data.record(microbatch, result)
                else:
                    self._pass_on(step, result)
            elif action.kind == UPDATE:
                self.update(action)
            elif action.kind == BACKWARD or action.kind == INPUT_GRAD:
                if stage.versions is not None:  # counted for the next update of an asynchronous schedule
                    self.accumulated[action.stage] = self.accumulated.get(action.stage, 0) + 1
                grads = None if step.receives is None else self._received(step)
                if action.kind == BACKWARD:
                    input_grads = stage.backward(microbatch, grads, action in self.last_backward)
                else:
                    input_grads = stage.backward_input(microbatch, grads)
                if self.detect_anomaly:
                    require_finite("the gradient sent to the previous stage", input_grads)
                    if action.kind == BACKWARD:
                        require_finite("a parameter gradient", [p.grad for p in stage.module.parameters()])
                if step.sends is not None:
                    self._pass_on(step, input_grads)
            elif action.kind == WEIGHT_GRAD:
                stage.backward_weight(microbatch, action in self.last_backward)
                if self.detect_anomaly:
                    require_finite("a parameter gradient", [p.grad for p in stage.module.parameters()])
        except PipelineError:
            raise
        except Exception as error:
            hint = ""
            if action.kind == FORWARD and received is not None:
                hint = f" (its input from stage {action.stage - 1} was {describe(received)})"
            raise PipelineError(f"{type(error).__name__}: {error}{hint}", rank=self.rank, stage=action.stage,
                                microbatch=microbatch, action=str(action)) from error
        self.trace.append((step.text, self.ready_at, time.perf_counter(), self.ready_at - began))

    def _failed(self, error: Exception, step: Step) -> PipelineError:
        action = step.action
        return PipelineError(f"{type(error).__name__}: {error}", rank=self.rank, stage=action.stage,
                             microbatch=action.microbatch, action=str(action))

    def _run_pair(self, forward: Step, backward: Step, data: StepData | StreamFeed) -> None:
        """An F&B pair: the backward's gradient is received first and its engine run on a second
        thread while this one runs the forward (receive, compute, send), so that each chunk's
        waiting (a collective inside the stage, a transfer) hides under the other's compute. The
        transport is used from this thread only; the forward's message goes out before the
        backward's, as :func:`~conveyor.schedule.links.link_order` has it."""
        began = time.perf_counter()
        action = backward.action
        stage = self.stages[action.stage]
        try:
            grads = None if backward.receives is None else self._receive(backward.receives, backward.source)
            last = action in self.last_backward
            job = stage.backward_job(action.microbatch, grads, split=action.kind == INPUT_GRAD, last=last)
        except Exception as error:
            raise self._failed(error, backward) from error
        ready = time.perf_counter()
        if self._backward_thread is None:
            # torch's intra-op thread count is per thread: a new thread would use every core (and on a
            # shared CPU spin against the other ranks), so it gets this thread's count
            self._backward_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"conveyor-pair-{self.rank}",
                                                       initializer=torch.set_num_threads,
                                                       initargs=(torch.get_num_threads(),))
        pending = self._backward_thread.submit(job)
        try:
            self.run(forward, data)
        except BaseException:
            pending.exception()  # the backward chunk ends before the forward's error surfaces
            raise
        try:
            input_grads = pending.result()
            stage.backward_job_done(last)
        except Exception as error:
            raise self._failed(error, backward) from error
        try:
            if self.detect_anomaly:
                require_finite("the gradient sent to the previous stage", input_grads)
                if action.kind == BACKWARD:
                    require_finite("a parameter gradient", [p.grad for p in stage.module.parameters()])
            if backward.sends is not None:
                self._pass_on(backward, input_grads)
        except Exception as error:
            raise self._failed(error, backward) from error
        self.trace.append((backward.text, ready, time.perf_counter(), ready - began))

    def close(self) -> None:
        """Stop the thread that runs the backward chunk of F&B pairs, if one was started."""
        if self._backward_thread is not None:
            self._backward_thread.shutdown(wait=True)
            self._backward_thread = None
