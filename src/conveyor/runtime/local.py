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

from ..partition.pipe import Pipe
from ..schedule import Schedule, make_schedule
from ..schedule.links import Message
from ..schedule.validate import execution_order
from .entry import PipelineEntry, check_arguments, check_options
from .executor import Executor
from .feed import StepData
from .generate import Decode, GenerationRun, message_in, message_out
from .lanes import LaneMailbox, Lanes
from .local_ties import LocalTies, separate_shared
from .precision import check_precision
from .stage import LossFn, StageExecutor
from .steps import Step, step_of

__all__ = ["LocalPipeline"]

DeviceLike = torch.device | str


def _default_devices(n_ranks: int) -> list[torch.device]:
    if torch.cuda.is_available():
        return [torch.device("cuda", rank % torch.cuda.device_count()) for rank in range(n_ranks)]
    return [torch.device("cpu")] * n_ranks


class LocalPipeline(PipelineEntry):
    """Runs a :class:`Pipe` in this process on a schedule: PipelineRunner's API without processes.

    ``devices`` lists one device per rank of the schedule (``n_ranks`` of them; default: one rank
    per stage, rank ``r`` on ``cuda:r mod GPU count``, or the CPU); a single device is used for
    every rank. Stage ``s`` lives on the device of the rank the schedule places it on.
    ``precision`` is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (see ``precision.py``); the other
    options (``detect_anomaly`` among them) mean what they mean for :class:`PipelineRunner`. The
    pipe's stage modules are moved to their devices in place; a parameter shared by stages on
    different devices is split into copies that get the summed gradient (``local_ties.py``).
    :attr:`trace` lists the last step's actions of every rank (``rank`` is the lane).
    """

    def __init__(self, pipe: Pipe, *, schedule: str | Schedule, n_microbatches: int,
                 loss_fn: LossFn | None = None, devices: Sequence[DeviceLike] | DeviceLike | None = None,
                 n_ranks: int | None = None, recompute: bool = False, precision: str = "fp32",
                 loss_weighting: str = "rows", ignore_index: int = -100, detect_anomaly: bool = False,
                 init_fn: Callable[[nn.Module], None] | None = None, **schedule_options: Any) -> None:
        check_arguments(n_microbatches, loss_weighting)
        check_options(LocalPipeline, schedule, schedule_options)
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
                             "interleaved-1f1b, zb-h1, zb-h2, zb-v, v-zb, v-min, v-half, dualpipev); use "
                             "PipelineRunner for the others")
        self.lanes = Lanes(device_list)
        self._keep(pipe, n_microbatches, loss_fn, loss_weighting=loss_weighting, ignore_index=ignore_index,
                   detect_anomaly=detect_anomaly, precision=precision, recompute=recompute)
        last = pipe.n_stages - 1
        stage_devices = [self.device_of(i) for i in range(pipe.n_stages)]
        ties = dict(getattr(pipe, "ties", {}) or {})
        ties.update(separate_shared([pipe.stage_module(i) for i in range(pipe.n_stages)], stage_devices))
        self.stages: list[StageExecutor] = [self._make_stage(index, device, init_fn)
                                            for index, device in enumerate(stage_devices)]
        self.ties = LocalTies(ties, [s.module for s in self.stages], stage_devices)
        self._inputs_to, self._targets_to = stage_devices[0], stage_devices[last]
        self._mailbox: dict[Message, tuple[Any, Any]] = {}
        self._executors = [Executor(lane, self.stages, LaneMailbox(self.lanes, lane, self._mailbox),
                                    detect_anomaly=detect_anomaly) for lane in range(n_ranks)]
        self._orders: dict[bool, list[tuple[int, Step]]] = {
            training: [(lane, step_of(action, program)) for lane, action in execution_order(program)]
            for training, program in ((True, self.schedule), (False, self.schedule.forward_only()))}

    # --- generation (generate.py) ------------------------------------------------------------------
    def _generation_held(self) -> dict[int, tuple[nn.Module, torch.device]]:
        return {stage.index: (stage.module, self.device_of(stage.index)) for stage in self.stages}

    def _generate(self, run: GenerationRun, devices: dict[int, torch.device]) -> tuple[torch.Tensor, int]:
        mailbox: dict[Message, Any] = {}
        n_stages, n_lanes, n_steps = run.n_stages, run.n_lanes, run.n_steps

        def receive(action: Decode) -> Any:
            return mailbox.pop(message_in(action, n_stages, n_lanes)[0])  # type: ignore[index]

        def send(action: Decode, value: Any) -> None:
            mailbox[message_out(action, n_stages, n_lanes, n_steps)[0]] = value  # type: ignore[index]

        self._run_generation(run, devices, receive, send)
        return run.result()

    def device_of(self, stage: int) -> torch.device:
        """The device stage ``stage`` lives on."""
        return self.lanes.devices[self.schedule.placement[stage]]

    # --- parameters and state ------------------------------------------------------------------
    @property
    def modules(self) -> list[nn.Module]:
        return [stage.module for stage in self.stages]

    def _any_overflow(self, local: bool) -> bool:
        return local  # every stage is in this process: the local flag is the global one

    @property
    def peak_stashed(self) -> dict[int, int]:
        return {stage.index: stage.peak_stashed for stage in self.stages}

    # --- running (entry.py's hooks) -------------------------------------------------------------
    def _before_step(self) -> None:
        self.ties.before_step()

    def _after_step(self) -> None:
        self.ties.after_step()

    def _execute(self, data: StepData) -> None:
        for stage in self.stages:
            stage.reset_stats()
        for executor in self._executors:
            executor.loss_scale = self.loss_scale
            executor.trace = []
        self._mailbox.clear()
        executors, on = self._executors, self.lanes.on
        self.lanes.begin()
        try:
            for lane, step in self._orders[data.training]:
                with on(lane):
                    executors[lane].run(step, data)
        finally:
            self.lanes.end()
