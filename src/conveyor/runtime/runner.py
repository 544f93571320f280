"""PipelineRunner: executes this rank's share of a schedule, step after step."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import PipelineError
from ..partition.pipe import Pipe, materialize
from ..schedule import Schedule, make_schedule
from ..schedule.actions import BACKWARD, FORWARD, INPUT_GRAD, UPDATE, WEIGHT_GRAD, Action
from ..schedule.links import incoming, incoming_stream
from .bundle import describe, flatten
from .devices import default_device, make_transport
from .feed import StepData, StreamFeed
from .microbatch import loss_weights, merge, split_batch, split_value
from .plan import Step, step_of, steps_of
from .precision import LossScaler, ScaledStep, autocast_for, check_precision, overflow_in_group
from .replicas import ReplicaGroup
from .stage import LossFn, StageExecutor
from .stage_modules import StageModules
from .ties import TiedGradients
from .versions import WeightVersions

__all__ = ["PipelineRunner", "TraceEvent", "STREAM_TRACE_LIMIT"]

STREAM_TRACE_LIMIT = 100_000  # a stream's trace keeps its last this many actions


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


def _default_device(group: dist.ProcessGroup | None) -> torch.device:
    return default_device(group)  # devices.py: cuda:<local rank> when GPUs exist


class PipelineRunner(StageModules, ScaledStep):
    """Runs a :class:`Pipe` on the ranks of ``group`` (default: the whole job) on a schedule.

    Every rank constructs the runner and makes the same calls. ``schedule`` is a name from
    ``conveyor.schedule.SCHEDULES`` or a :class:`Schedule`; ``schedule_options`` go to its
    generator. ``loss_weighting="tokens"`` weights micro-batch losses by the number of target
    entries that differ from ``ignore_index`` (for token-averaged losses), ``"rows"`` (default)
    by rows. ``broadcast_loss=True`` returns the loss on every rank. ``detect_anomaly=True`` stops
    the step at the first NaN or infinity in a loss, a boundary gradient or a parameter gradient,
    naming the stage and micro-batch. Every wait for a peer is
    bounded by the process group's timeout (``launch(pg_timeout=...)``, or ``timeout=`` of
    ``init_process_group``).
    """

    def __init__(self, pipe: Pipe, *, schedule: str | Schedule, n_microbatches: int,
                 loss_fn: LossFn | None = None, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, recompute: bool = False,
                 replicas: list[int] | None = None, loss_weighting: str = "rows", ignore_index: int = -100,
                 broadcast_loss: bool = False, detect_anomaly: bool = False,
                 init_fn: Callable[[nn.Module], None] | None = None, precision: str = "fp32",
                 transport: str = "auto", **schedule_options: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("PipelineRunner needs a process group: run inside conveyor.launch(...), "
                               "conveyor.run(...) under torchrun, or call torch.distributed.init_process_group")
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        if loss_weighting not in ("rows", "tokens"):
            raise ValueError(f"loss_weighting={loss_weighting!r} is not one of 'rows', 'tokens'")
        self.group = group
        self.rank = dist.get_rank(group)
        self.n_ranks = dist.get_world_size(group)
        if replicas is not None:
            schedule_options["replicas"] = list(replicas)
        self.schedule = make_schedule(schedule, self.n_ranks, pipe.n_stages, n_microbatches, **schedule_options)
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.loss_weighting = loss_weighting
        self.ignore_index = ignore_index
        self.broadcast_loss = broadcast_loss
        self.detect_anomaly = detect_anomaly
        self.device = torch.device(device) if device is not None else _default_device(group)
        self.recompute = recompute
        self.pipe = pipe
        last = pipe.n_stages - 1
        self.stages: dict[int, StageExecutor] = {}
        for index in self.schedule.stages_of(self.rank):
            module = materialize(pipe.stage_module(index), self.device, init_fn)
            self.stages[index] = StageExecutor(index, module, is_first=index == 0, is_last=index == last,
                                               loss_fn=loss_fn, recompute=recompute, device=self.device)
            self.stages[index].precision_context = autocast_for(check_precision(precision, self.schedule.is_streaming),
                                                                     self.device)
        self.precision = precision
        self.scaler: LossScaler | None = LossScaler() if precision == "fp16" else None
        if self.schedule.is_streaming:
            if getattr(pipe, "ties", None):
                raise ValueError(f"schedule {self.schedule.name!r} updates each stage on its own, so tied weights "
                                 "across stages would drift apart: untie them or use a synchronous schedule")
            for stage in self.stages.values():
                stage.versions = WeightVersions(stage.module)
        self._optimizer: torch.optim.Optimizer | None = None
        self._accumulated: dict[int, int] = {}  # stage -> backwards since its last update
        forward_program = self.schedule.forward_only()
        self._incoming = {True: incoming(self.schedule, self.rank), False: incoming(forward_program, self.rank)}
        self._steps = {True: steps_of(self.schedule, self.rank), False: steps_of(forward_program, self.rank)}
        self.transport = make_transport(transport, group, self.device)
        self.ties: dict[str, list[int]] = dict(getattr(pipe, "ties", {}) or {})
        self._tied = TiedGradients(self.ties, self.schedule.placement, self.rank, dict(self.named_parameters()),
                                   group, through_host=self.transport.device != self.device)
        self._tied.align_values()
        self._trace: list[tuple[str, float, float, float]] | collections.deque = []  # (action, start, end, waited)
        self._ready = 0.0
        self._last_stage_rank = self.schedule.placement[last]  # the first replica if it is replicated
        self._holds_last = last in self.stages
        self._replicas = {stage: ReplicaGroup(self.schedule.replicas[stage], self.rank, self.transport.pg)
                          for stage in self.stages if len(self.schedule.replicas[stage]) > 1}
        if self._replicas and self.ties:
            raise ValueError("replicated stages with tied weights are not supported: untie them or drop replicas")
        for stage, replicas_of_stage in self._replicas.items():
            module = self.stages[stage].module
            replicas_of_stage.align(list(module.parameters()) + list(module.buffers()))

    @property
    def trace(self) -> list[TraceEvent]:
        """This rank's actions of the last step (or the stream's last ``STREAM_TRACE_LIMIT``)."""
        return [TraceEvent(self.rank, *event) for event in self._trace]

    # --- parameters and state ------------------------------------------------------------------
    @property
    def modules(self) -> list[nn.Module]:
        """The stage modules held by this rank, in stage order."""
        return [self.stages[index].module for index in sorted(self.stages)]

    def _where(self) -> str:
        return f"rank {self.rank}: "

    def save(self, path: str, optimizer: torch.optim.Optimizer | None = None, *, step: int | None = None,
             extra: Any = None) -> dict[str, Any]:
        """Write a partition-agnostic checkpoint (every rank calls this; see ``conveyor.checkpoint.save``)."""
        from ..checkpoint import save

        return save(self, path, optimizer, step=step, extra=extra)

    def load(self, path: str, optimizer: torch.optim.Optimizer | None = None, *,
             strict: bool = True) -> dict[str, Any]:
        """Load a checkpoint saved by any layout; returns its manifest (see ``conveyor.checkpoint.load``)."""
        from ..checkpoint import load

        return load(self, path, optimizer, strict=strict)

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip gradients by their norm over every stage of the pipeline (a tied parameter counted
        once); returns that norm."""
        counted = [p for name, p in self.named_parameters()
                   if name not in self.ties or self.schedule.placement[min(self.ties[name])] == self.rank]
        grads = [p.grad for p in counted if p.grad is not None]
        if norm_type == float("inf"):
            local = max((g.detach().abs().max() for g in grads), default=torch.tensor(0.0))
            total = local.to(self.device, torch.float64).reshape(1)
            dist.all_reduce(total, op=dist.ReduceOp.MAX, group=self.group)
            norm = total[0]
        else:
            local = sum((g.detach().double().abs().pow(norm_type).sum() for g in grads), torch.tensor(0.0,
                        dtype=torch.float64))
            total = torch.as_tensor(local, dtype=torch.float64, device=self.device).reshape(1)
            dist.all_reduce(total, group=self.group)
            norm = total[0] ** (1.0 / norm_type)
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
        return norm

    @property
    def peak_versions(self) -> dict[int, int]:
        """Per stage on this rank: the most weight versions held at once (asynchronous schedules;
        1 for synchronous ones, which only have the live weights)."""
        return {index: stage.versions.peak if stage.versions is not None else 1 for index, stage in self.stages.items()}

    @property
    def peak_stashed(self) -> dict[int, int]:
        """Per stage on this rank: the most micro-batches whose activations were held at once
        during the last step (with recompute: whose inputs were held)."""
        return {index: stage.peak_stashed for index, stage in self.stages.items()}

    def _any_overflow(self, local: bool) -> bool:
        return overflow_in_group(local, self.group)

    # --- running ----------------------------------------------------------------------------------
    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> torch.Tensor | None:
        """Forward and backward of the whole batch; gradients accumulate in :meth:`parameters`.

        Returns the batch's mean loss on the rank of the last stage (every rank with
        ``broadcast_loss=True``), None elsewhere.
        """
        if self.loss_fn is None:
            raise ValueError("step() trains and needs a loss: pass loss_fn=... to PipelineRunner "
                             "(or call forward() for inference)")
        if target is None:
            raise ValueError("loss_fn needs a target: call step(inputs..., target=labels)")
        if self.schedule.is_streaming:
            raise ValueError(f"schedule {self.schedule.name!r} updates the weights inside the pipeline: train "
                             "with runner.stream(batches, optimizer) instead of step()")
        data = self._prepare(inputs, kwargs, target, training=True)
        self._unscaled = False  # precision.py: this step's gradients are still scaled
        self._tied.before_step()
        self._execute(data)
        self._tied.after_step()
        for stage, replicas_of_stage in self._replicas.items():
            replicas_of_stage.sum_gradients(p for p in self.stages[stage].module.parameters() if p.requires_grad)
        loss = None
        if self._holds_last:
            dtype = next(iter(data.losses.values())).dtype
            loss = sum((data.losses[i].double() * data.weights[i] for i in sorted(data.losses)),
                       torch.tensor(0.0, dtype=torch.float64, device=self.device))
            if self.pipe.n_stages - 1 in self._replicas:
                loss = self._replicas[self.pipe.n_stages - 1].sum_value(loss.reshape(1))[0]
            loss = loss.to(dtype)
        if self.broadcast_loss:
            value = loss if loss is not None else torch.zeros((), device=self.device)
            value = value.to(torch.float32).reshape(1).clone()
            dist.broadcast(value, dist.get_global_rank(self.group, self._last_stage_rank)
                           if self.group is not None else self._last_stage_rank, group=self.group)
            loss = value[0]
        return loss

    @torch.no_grad()
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Forward-only pipeline (no autograd graph). Returns the merged output of the last stage
        on its rank, None elsewhere."""
        if len(self.schedule.replicas[-1]) > 1:
            raise ValueError("forward() with a replicated last stage is not supported: build an inference "
                             "runner without replicas on the last stage")
        data = self._prepare(inputs, kwargs, None, training=False)
        self._execute(data)
        if not self._holds_last:
            return None
        return merge([data.outputs[i] for i in range(self.n_microbatches)])

    def stream(self, batches: Iterable[Any], optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
        """Train on a stream of ``(inputs, target)`` batches without draining between them
        (asynchronous schedules); ``optimizer`` (built on :meth:`parameters`) is stepped by the
        pipeline's update actions, each applying the mean gradient of the micro-batches since the
        stage's previous update. Yields each micro-batch's loss, in order, on the last stage's
        rank (nothing elsewhere). Every rank iterates the same batches and consumes the whole
        generator; the pipeline drains once, when ``batches`` ends. :attr:`trace` then holds
        the stream's last ``STREAM_TRACE_LIMIT`` actions, :attr:`peak_versions` and
        :attr:`peak_stashed` its peaks.
        """
        if self.schedule.stream is None:
            raise ValueError(f"schedule {self.schedule.name!r} is synchronous: train it with step(); stream() "
                             "runs asynchronous schedules ('pipedream', 'pipedream-2bw')")
        if self.loss_fn is None:
            raise ValueError("stream() trains and needs a loss: pass loss_fn=... to PipelineRunner")
        feed = StreamFeed(iter(batches), self.n_microbatches, self.device, keeps_inputs=0 in self.stages,
                          keeps_targets=self._holds_last)
        self._optimizer = optimizer
        optimizer.zero_grad(set_to_none=True)
        for stage in self.stages.values():  # version 0 of this stream: the weights as they are now
            stage.versions = WeightVersions(stage.module)
        self._accumulated = {}
        self.transport.expect(incoming_stream(self.schedule, self.rank, feed.exists))
        self._trace = trace = collections.deque(maxlen=STREAM_TRACE_LIMIT)
        for stage in self.stages.values():
            stage.reset_stats()
        try:
            for action in self.schedule.stream(self.rank, feed.exists):
                step = step_of(action, self.schedule)
                began = self._ready = time.perf_counter()
                self._run(step, feed)
                trace.append((step.text, self._ready, time.perf_counter(), self._ready - began))
                if action.kind == FORWARD and action.microbatch in feed.losses:
                    yield feed.losses.pop(action.microbatch)
            self.transport.finish()
        finally:
            self._optimizer = None

    def _update(self, action: Action) -> None:
        """Step the optimizer on the mean gradient accumulated since this stage's last update."""
        stage = self.stages[action.stage]
        if self._optimizer is None or stage.versions is None:
            raise RuntimeError(f"{action} needs an optimizer: run asynchronous schedules with stream()")
        count = self._accumulated.pop(action.stage, 0)
        self.transport.flush()  # no staged message may wait behind the replicas' collective
        if action.stage in self._replicas:
            replicas_of_stage = self._replicas[action.stage]
            replicas_of_stage.sum_gradients(stage.versions.live.values())
            count *= replicas_of_stage.size  # the schedule gives every replica the same share
        if count > 1:
            for parameter in stage.versions.live.values():
                if parameter.grad is not None:
                    parameter.grad.div_(count)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        stage.versions.updated(action.version)

    def _prepare(self, inputs: tuple, kwargs: dict, target: Any, *, training: bool) -> StepData:
        data = StepData(training=training)
        if 0 in self.stages:
            to_device = [x.to(self.device) if isinstance(x, torch.Tensor) else x for x in inputs]
            kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            data.microbatches = split_batch(tuple(to_device), kwargs, self.n_microbatches)
        if training and self._holds_last:
            target = target.to(self.device) if isinstance(target, torch.Tensor) else target
            size = _first_dim(target)
            if size < self.n_microbatches:
                raise ValueError(f"the target has {size} rows, fewer than {self.n_microbatches} micro-batches")
            data.targets = split_value(target, size, self.n_microbatches)
            data.weights = loss_weights(data.targets, self.loss_weighting, self.ignore_index)
        return data

    def _execute(self, data: StepData) -> None:
        """Run this rank's program for ``data`` (training or forward-only)."""
        for stage in self.stages.values():
            stage.reset_stats()
        self.transport.expect(self._incoming[data.training])
        self._trace = trace = []
        clock = time.perf_counter
        for step in self._steps[data.training]:
            began = self._ready = clock()
            self._run(step, data)
            trace.append((step.text, self._ready, clock(), self._ready - began))
        self.transport.finish()

    def _run(self, step: Step, data: StepData | StreamFeed) -> None:
        action = step.action
        stage = self.stages[action.stage]
        microbatch = action.microbatch
        received: Any = None
        try:
            if action.kind == FORWARD:
                if step.receives is None:
                    args, kwargs = data.inputs(microbatch)
                else:
                    received = self._receive(step)
                    args, kwargs = (received,), {}
                target, weight = data.target(microbatch) if stage.is_last and data.training else (None, 1.0)
                weight *= self.loss_scale  # fp16 (precision.py): the last stage's loss is scaled
                result = stage.forward(microbatch, args, kwargs, target=target, weight=weight, training=data.training,
                                       version=action.version, fresh=received is not None)
                if stage.is_last:
                    if self.detect_anomaly and data.training:
                        _require_finite("the loss", [result])
                    data.record(microbatch, result)
                else:
                    self._send(step, result)
            elif action.kind == UPDATE:
                self._update(action)
            elif action.kind in (BACKWARD, INPUT_GRAD):
                if stage.versions is not None:  # counted for the next update of an asynchronous schedule
                    self._accumulated[action.stage] = self._accumulated.get(action.stage, 0) + 1
                grads = None if step.receives is None else self._receive(step)
                run = stage.backward if action.kind == BACKWARD else stage.backward_input
                input_grads = run(microbatch, grads)
                if self.detect_anomaly:
                    _require_finite("the gradient sent to the previous stage", input_grads)
                    if action.kind == BACKWARD:
                        _require_finite("a parameter gradient", [p.grad for p in stage.module.parameters()])
                if step.sends is not None:
                    self._send(step, input_grads)
            elif action.kind == WEIGHT_GRAD:
                stage.backward_weight(microbatch)
                if self.detect_anomaly:
                    _require_finite("a parameter gradient", [p.grad for p in stage.module.parameters()])
        except PipelineError:
            raise
        except Exception as error:
            hint = ""
            if action.kind == FORWARD and received is not None:
                hint = f" (its input from stage {action.stage - 1} was {describe(received)})"
            raise PipelineError(f"{type(error).__name__}: {error}{hint}", rank=self.rank, stage=action.stage,
                                microbatch=microbatch, action=str(action)) from error

    def _receive(self, step: Step) -> Any:
        assert step.receives is not None
        value = self.transport.receive(step.receives, step.source)
        self._ready = time.perf_counter()
        return value

    def _send(self, step: Step, value: Any) -> None:
        assert step.sends is not None
        if step.destination == self.rank:
            self.transport.deliver_local(step.sends, value)
        else:
            self.transport.send(step.destination, step.sends, value)


def _require_finite(what: str, tensors: list[torch.Tensor | None]) -> None:
    for tensor in tensors:
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "infinity"
            raise FloatingPointError(f"{what} contains {kind} (detect_anomaly=True)")


def _first_dim(value: Any) -> int:
    tensors = flatten(value, "target")[1]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("the target needs a batch dimension (dim 0) to split into micro-batches")
    return tensors[0].shape[0]
