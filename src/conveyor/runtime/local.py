"""LocalPipeline: every stage in this one process, on one or several devices, no process group.

The schedule's ranks become *lanes* (a device and, on CUDA, its own stream; ``lanes.py``). The
merged program of all ranks runs in one legal global order (``schedule.validate.execution_order``,
the order in which a run with unbounded buffers would execute it), each action queued on its
lane's stream, so the GPUs work concurrently while this thread only enqueues kernels. Boundary
values are handed over in memory: the consumer lane waits on the producer's event and copies
the value to its device without blocking. The stages are the same
:class:`~conveyor.runtime.stage.StageExecutor` objects a :class:`PipelineRunner` uses, so the
gradients equal the unsplit model's exactly as in the multi-process runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn

from ..errors import PipelineError
from ..partition.pipe import Pipe, materialize
from ..schedule import Schedule, make_schedule
from ..schedule.actions import BACKWARD, FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action
from ..schedule.links import ACTIVATION, GRADIENT, Message
from ..schedule.validate import execution_order
from .bundle import describe, flatten
from .lanes import Lanes
from .local_ties import LocalTies, separate_shared
from .microbatch import loss_weights, merge, split_batch, split_value
from .precision import LossScaler, ScaledStep, autocast_for, check_precision
from .stage import LossFn, StageExecutor
from .stage_modules import StageModules

__all__ = ["LocalPipeline"]

DeviceLike = torch.device | str


def _default_devices(n_ranks: int) -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", rank % torch.cuda.device_count()) for rank in range(n_ranks)]
    return [torch.device("cpu")] * n_ranks


class LocalPipeline(StageModules, ScaledStep):
    """Runs a :class:`Pipe` in this process on a schedule: PipelineRunner's API without processes.

    ``devices`` lists one device per rank of the schedule (``n_ranks`` of them; default: one rank
    per stage, rank ``r`` on ``cuda:r mod GPU count``, or the CPU); a single device is used for
    every rank. Stage ``s`` lives on the device of the rank the schedule places it on.
    ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see ``precision.py``); the other
    options mean what they mean for :class:`PipelineRunner`. The pipe's stage modules are moved
    to their devices in place; a parameter shared by stages on different devices is split into
    copies that get the summed gradient (``local_ties.py``).
    """

    def __init__(self, pipe: Pipe, *, schedule: str | Schedule, n_microbatches: int,
                 loss_fn: LossFn | None = None, devices: Sequence[DeviceLike] | DeviceLike | None = None,
                 n_ranks: int | None = None, recompute: bool = False, precision: str = "fp32",
                 loss_weighting: str = "rows", ignore_index: int = -100,
                 init_fn: Callable[[nn.Module], None] | None = None, **schedule_options: Any) -> None:
        if n_microbatches < 1:
            raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
        if loss_weighting not in ("rows", "tokens"):
            raise ValueError(f"loss_weighting={loss_weighting!r} is not one of 'rows', 'tokens'")
        check_precision(precision)
        listed = devices is not None and not isinstance(devices, (str, torch.device))
        if n_ranks is None:
            n_ranks = len(devices) if listed else pipe.n_stages  # type: ignore[arg-type]
        if devices is None:
            device_list = _default_devices(n_ranks)
        elif listed:
            device_list = [torch.device(d) for d in devices]  # type: ignore[union-attr]
        else:
            device_list = [torch.device(devices)] * n_ranks  # type: ignore[arg-type]
        if len(device_list) != n_ranks:
            raise ValueError(f"devices lists {len(device_list)} devices for {n_ranks} ranks: give one per rank "
                             "of the schedule (or a single device for all)")
        self.schedule = make_schedule(schedule, n_ranks, pipe.n_stages, n_microbatches, **schedule_options)
        if self.schedule.is_streaming or self.schedule.is_replicated:
            raise ValueError(f"schedule {self.schedule.name!r} updates weights inside the pipeline or replicates "
                             "stages: LocalPipeline runs synchronous schedules without replicas (gpipe, 1f1b, "
                             "interleaved-1f1b, zb-h1, zb-v); use PipelineRunner for the others")
        self.lanes = Lanes(device_list)
        self.pipe = pipe
        self.n_microbatches = n_microbatches
        self.loss_fn = loss_fn
        self.loss_weighting = loss_weighting
        self.ignore_index = ignore_index
        self.precision = precision
        self.scaler: LossScaler | None = LossScaler() if precision == "fp16" else None
        last = pipe.n_stages - 1
        stage_devices = [self.device_of(i) for i in range(pipe.n_stages)]
        ties = dict(getattr(pipe, "ties", {}) or {})
        ties.update(separate_shared([pipe.stage_module(i) for i in range(pipe.n_stages)], stage_devices))
        self.stages: list[StageExecutor] = []
        for index in range(pipe.n_stages):
            device = stage_devices[index]
            module = materialize(pipe.stage_module(index), device, init_fn)
            stage = StageExecutor(index, module, is_first=index == 0, is_last=index == last, loss_fn=loss_fn,
                                  recompute=recompute, device=device)
            stage.precision_context = autocast_for(precision, device)
            self.stages.append(stage)
        self.ties = LocalTies(ties, [s.module for s in self.stages], stage_devices)
        self._orders = {True: execution_order(self.schedule),
                        False: execution_order(self.schedule.forward_only())}

    def device_of(self, stage: int) -> torch.device:
        """The device stage ``stage`` lives on."""
        return self.lanes.devices[self.schedule.placement[stage]]

    # --- parameters and state ------------------------------------------------------------------
    @property
    def modules(self) -> list[nn.Module]:
        return [stage.module for stage in self.stages]

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip every gradient by the norm over all stages (a tied parameter counted once)."""
        seen_names: set[str] = set()
        grads = []
        for name, parameter in self.named_parameters():
            if name in seen_names or parameter.grad is None:
                continue
            seen_names.add(name)
            grads.append(parameter.grad.detach())
        if norm_type == float("inf"):
            norm = max((g.abs().max().double().cpu() for g in grads), default=torch.tensor(0.0, dtype=torch.float64))
        else:
            total = sum((g.double().abs().pow(norm_type).sum().cpu() for g in grads),
                        torch.tensor(0.0, dtype=torch.float64))
            norm = total ** (1.0 / norm_type)
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for parameter in self.parameters():
                if parameter.grad is not None:
                    parameter.grad.mul_(scale)
        return norm

    def _any_overflow(self, local: bool) -> bool:
        return local  # every stage is in this process: the local flag is the global one

    @property
    def peak_stashed(self) -> dict[int, int]:
        return {stage.index: stage.peak_stashed for stage in self.stages}

    # --- running ----------------------------------------------------------------------------------
    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> torch.Tensor:
        """Forward and backward of the whole batch; returns its mean loss (on the last stage's device)."""
        if self.loss_fn is None:
            raise ValueError("step() trains and needs a loss: pass loss_fn=... to LocalPipeline "
                             "(or call forward() for inference)")
        if target is None:
            raise ValueError("loss_fn needs a target: call step(inputs..., target=labels)")
        self._unscaled = False
        microbatches = self._split_inputs(inputs, kwargs)
        last = self.stages[-1].device
        target = target.to(last) if isinstance(target, torch.Tensor) else target
        size = _first_dim(target)
        if size < self.n_microbatches:
            raise ValueError(f"the target has {size} rows, fewer than {self.n_microbatches} micro-batches")
        targets = split_value(target, size, self.n_microbatches)
        weights = loss_weights(targets, self.loss_weighting, self.ignore_index)
        self.ties.before_step()
        losses = self._execute(self._orders[True], microbatches, targets, weights)
        self.ties.after_step()
        total = sum((losses[i].double() * w for i, w in enumerate(weights)),
                    torch.tensor(0.0, dtype=torch.float64, device=last))
        return total.to(losses[0].dtype)

    @torch.no_grad()
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Forward-only pipeline (no autograd graph): the merged output of the last stage."""
        outputs = self._execute(self._orders[False], self._split_inputs(inputs, kwargs), None, None)
        return merge([outputs[i] for i in range(self.n_microbatches)])

    def _split_inputs(self, inputs: tuple, kwargs: dict) -> list[tuple[tuple, dict]]:
        first = self.stages[0].device
        moved = tuple(x.to(first) if isinstance(x, torch.Tensor) else x for x in inputs)
        kwargs = {k: v.to(first) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return split_batch(moved, kwargs, self.n_microbatches)

    def _execute(self, order: list[tuple[int, Action]], microbatches: list, targets: list | None,
                 weights: list[float] | None) -> dict[int, Any]:
        for stage in self.stages:
            stage.reset_stats()
        mailbox: dict[Message, tuple[Any, Any]] = {}
        results: dict[int, Any] = {}
        self.lanes.begin()
        try:
            for lane, action in order:
                with self.lanes.on(lane):
                    self._run(lane, action, mailbox, microbatches, targets, weights, results)
        finally:
            self.lanes.end()
        return results

    def _run(self, lane: int, action: Action, mailbox: dict, microbatches: list, targets: list | None,
             weights: list[float] | None, results: dict[int, Any]) -> None:
        stage = self.stages[action.stage]
        microbatch = action.microbatch
        training = targets is not None
        received: Any = None
        try:
            if action.kind == FORWARD:
                if stage.is_first:
                    args, kwargs = microbatches[microbatch]
                else:
                    received = self.lanes.take(*mailbox.pop(Message(ACTIVATION, action.stage - 1, microbatch)), lane)
                    args, kwargs = (received,), {}
                target = targets[microbatch] if stage.is_last and targets is not None else None
                weight = weights[microbatch] * self.loss_scale if stage.is_last and weights is not None else 1.0
                result = stage.forward(microbatch, args, kwargs, target=target, weight=weight, training=training)
                if stage.is_last:
                    results[microbatch] = result
                else:
                    mailbox[Message(ACTIVATION, action.stage, microbatch)] = (result, self.lanes.mark(lane))
            elif action.kind in (BACKWARD, INPUT_GRAD):
                grads = None
                if not stage.is_last:
                    grads = self.lanes.take(*mailbox.pop(Message(GRADIENT, action.stage + 1, microbatch)), lane)
                run = stage.backward if action.kind == BACKWARD else stage.backward_input
                input_grads = run(microbatch, grads)
                if not stage.is_first:
                    mailbox[Message(GRADIENT, action.stage, microbatch)] = (input_grads, self.lanes.mark(lane))
            elif action.kind == WEIGHT_GRAD:
                stage.backward_weight(microbatch)
        except PipelineError:
            raise
        except Exception as error:
            hint = ""
            if action.kind == FORWARD and received is not None:
                hint = f" (its input from stage {action.stage - 1} was {describe(received)})"
            raise PipelineError(f"{type(error).__name__}: {error}{hint}", rank=lane, stage=action.stage,
                                microbatch=microbatch, action=str(action)) from error


def _first_dim(value: Any) -> int:
    tensors = flatten(value, "target")[1]
    if not tensors or tensors[0].dim() == 0:
        raise ValueError("the target needs a batch dimension (dim 0) to split into micro-batches")
    return tensors[0].shape[0]
