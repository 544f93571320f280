"""PipelineRunner: executes this rank's share of a schedule, step after step."""

from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..partition.pipe import Pipe
from ..schedule import Schedule, make_schedule
from ..schedule.actions import FORWARD, Action
from ..schedule.links import incoming, incoming_stream
from .auto import AUTO, choose_schedule
from .data_parallel import last_backwards
from .data_parallel import unwrap as unwrap_module
from .devices import TransportFactory, default_device, make_transport
from .entry import PipelineEntry, check_arguments, check_options
from .executor import Executor, TraceEvent
from .feed import StepData, StreamFeed
from .generate import Decode, GenerationRun, incoming_messages, message_in, message_out
from .mesh_hooks import MeshHooks
from .norms import StageSlice, counted_piece
from .precision import check_precision, overflow_in_group
from .replicas import replica_groups
from .stage import LossFn, StageExecutor
from .stage_modules import original_name
from .steps import step_of, steps_of
from .ties import TiedGradients, check_ties
from .versions import WeightVersions
from .watchdog import DEFAULT_STALL_TIMEOUT, CallState, Watchdog, open_store

TIMEOUT_VARIABLE = "CONVEYOR_TIMEOUT"  # set by conveyor.launch to its pg_timeout
DEFAULT_TIMEOUT = 300.0

__all__ = ["PipelineRunner", "TraceEvent", "STREAM_TRACE_LIMIT"]

STREAM_TRACE_LIMIT = 100_000  # a stream's trace keeps its last this many actions


class PipelineRunner(PipelineEntry):
    """Runs a :class:`Pipe` on the ranks of ``group`` (default: the whole job) on a schedule.

    Every rank constructs the runner and makes the same calls. ``schedule`` is a name from
    ``conveyor.schedule.SCHEDULES`` or a :class:`Schedule`; ``schedule_options`` go to its
    generator (an option neither the runner nor the generator takes is a TypeError).
    ``schedule="auto"`` (one stage per rank) profiles the stages on the first training step's
    first micro-batch and runs the program ``conveyor.schedule.search`` finds for them, holding
    at most ``memory_limit`` micro-batches of activations per rank (option; default the number
    of ranks); ``auto_profile`` then holds the costs on rank 0 (``runtime/auto.py``).
    ``loss_weighting="tokens"`` weights micro-batch losses by the number of target entries that
    differ from ``ignore_index`` (for token-averaged losses), ``"rows"`` (default) by rows.
    ``broadcast_loss=True`` returns the loss on every rank. ``detect_anomaly=True`` stops the
    step at the first NaN or infinity in a loss, a boundary gradient or a parameter gradient,
    naming the stage and micro-batch. ``timeout`` (seconds) bounds every wait for a peer; by default
    the job's ``launch(pg_timeout=...)`` under :func:`conveyor.launch` (``CONVEYOR_TIMEOUT``
    in the environment), else 300. ``stall_timeout`` (seconds, default 60) ends the job when a rank
    stays in one action longer (waits for peers excluded); a watchdog thread per runner also
    ends it within seconds when the ranks make different calls or one of them left (see
    ``runtime/watchdog.py``). :meth:`close` (or leaving a ``with PipelineRunner(...) as runner:`` block) releases
    the connections.

    ``mesh`` (a ``DeviceMesh``, e.g. ``conveyor.mesh(pp=2, dp=2, tp=2)``; not with ``group``)
    runs the pipeline on ``mesh[pp_dim]``; its ``dp``/``dp_replicate``/``dp_shard`` dimensions
    are data parallel (each coordinate feeds its own shard of the batch to ``step``, which returns
    the global mean loss over all of them) and ``tp`` tensor parallel. ``parallelize(stage_module,
    mesh)`` is called once per local stage after materialisation and returns the module to run
    (``fully_shard``, ``DistributedDataParallel``, composable ``replicate``, ``parallelize_module``);
    data-parallel gradients are reduced once per stage per step, after its last backward
    (``data_parallel.py``). A trainable parameter that gets no gradient in a step is an error
    unless listed (by name) in ``unused_parameters``.
    """

    def __init__(self, pipe: Pipe, *, schedule: str | Schedule, n_microbatches: int,
                 loss_fn: LossFn | None = None, group: dist.ProcessGroup | None = None,
                 device: torch.device | str | None = None, recompute: bool = False,
                 replicas: list[int] | None = None, loss_weighting: str = "rows", ignore_index: int = -100,
                 broadcast_loss: bool = False, detect_anomaly: bool = False,
                 init_fn: Callable[[nn.Module], None] | None = None, precision: str = "fp32",
                 transport: str | TransportFactory = "auto", mesh: Any = None, pp_dim: str = "pp",
                 parallelize: Callable[[nn.Module, Any], nn.Module | None] | None = None,
                 unused_parameters: Iterable[str] = (), timeout: float | None = None,
                 stall_timeout: float = DEFAULT_STALL_TIMEOUT, **schedule_options: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("PipelineRunner needs a process group: run inside conveyor.launch(...), "
                               "conveyor.run(...) under torchrun, or call torch.distributed.init_process_group")
        check_arguments(n_microbatches, loss_weighting)
        check_options(PipelineRunner, schedule, schedule_options)
        if timeout is None:
            timeout = float(os.environ.get(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT))
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        if not stall_timeout > 0:
            raise ValueError(f"stall_timeout must be a positive number of seconds, got {stall_timeout}")
        self._mesh = MeshHooks(mesh, pp_dim, parallelize, group, replicas, unused_parameters)  # mesh_hooks.py
        group = self._mesh.group(group)
        self._mesh.check_unused_names(pipe)
        self.group = group
        self.rank = dist.get_rank(group)
        self.n_ranks = dist.get_world_size(group)
        if replicas is not None:
            schedule_options["replicas"] = list(replicas)
        self._auto_limit: int | None = None
        self._auto = schedule == AUTO
        if self._auto:
            self._auto_limit = schedule_options.pop("memory_limit", None)
            if schedule_options or pipe.n_stages != self.n_ranks:
                raise ValueError(f"schedule='auto' takes only the option memory_limit (got {sorted(schedule_options)}) "
                                 f"and places one stage per rank (the pipe has {pipe.n_stages} stages for "
                                 f"{self.n_ranks} ranks): cut the model into {self.n_ranks} stages")
            schedule = "1f1b"  # until the first training step has profiled the stages
        self.auto_profile: dict[str, Any] | None = None
        with self._mesh.explaining_schedule_errors(self.n_ranks):
            self.schedule = make_schedule(schedule, self.n_ranks, pipe.n_stages, n_microbatches, **schedule_options)
        self._mesh.check_schedule(self.schedule)
        if self.schedule.is_streaming and loss_weighting == "tokens":
            raise ValueError(f"schedule {self.schedule.name!r} cannot honour loss_weighting='tokens': it updates each "
                             "stage on the mean of the micro-batch losses since its previous update, over windows that "
                             "cut across batches, so there is no batch to share tokens over; keep "
                             "loss_weighting='rows' and weight tokens inside loss_fn (e.g. a sum over tokens divided "
                             "by a fixed token count), or train a synchronous schedule with step()")
        check_precision(precision, self.schedule.is_streaming)
        self._keep(pipe, n_microbatches, loss_fn, loss_weighting=loss_weighting, ignore_index=ignore_index,
                   detect_anomaly=detect_anomaly, precision=precision, recompute=recompute)
        self.broadcast_loss = broadcast_loss
        self.timeout = timeout
        self.stall_timeout = stall_timeout
        self.device = torch.device(device) if device is not None else default_device(group)
        last = pipe.n_stages - 1
        self.stages: dict[int, StageExecutor] = {index: self._mesh.parallelize(self._make_stage(index, self.device,
                                                                                                init_fn))
                                                 for index in self.schedule.stages_of(self.rank)}
        self._mesh.attach(self.stages, self.schedule, dict(getattr(pipe, "ties", {}) or {}))
        check_ties(self.schedule, dict(getattr(pipe, "ties", {}) or {}))  # also the planner's Candidate.runnable
        if self.schedule.is_streaming:
            for stage in self.stages.values():
                stage.versions = WeightVersions(stage.module)
        self._optimizer: torch.optim.Optimizer | None = None
        forward_program = self.schedule.forward_only()
        self._incoming = {True: incoming(self.schedule, self.rank), False: incoming(forward_program, self.rank)}
        self._steps = {True: steps_of(self.schedule, self.rank), False: steps_of(forward_program, self.rank)}
        self.transport = make_transport(transport, group, self.device, timeout=timeout)
        self.ties: dict[str, list[int]] = dict(getattr(pipe, "ties", {}) or {})
        self._tied = TiedGradients(self.ties, self.schedule.placement, self.rank, dict(self.named_parameters()),
                                   group, through_host=self.transport.device != self.device)
        self._tied.align_values()
        self._holds_last = last in self.stages
        self._last_stage_rank = self.schedule.placement[last]  # the first replica if it is replicated
        self._inputs_to = self.device if 0 in self.stages else None
        self._targets_to = self.device if self._holds_last else None
        self._norm_device = self.device
        self._executor = Executor(self.rank, self.stages, self.transport, detect_anomaly=detect_anomaly,
                                  update=self._update)
        self._executor.last_backward = last_backwards(self.schedule, self.rank)  # data parallelism syncs after them
        self._executors = [self._executor]
        self._replicas = replica_groups(self.schedule.replicas, self.rank, group, self.transport.pg)
        for stage, replicas_of_stage in self._replicas.items():
            module = self.stages[stage].module
            replicas_of_stage.align(list(module.parameters()) + list(module.buffers()))
        self._uncounted = {original_name(name) for stage, replicas_of_stage in self._replicas.items()
                           if replicas_of_stage.rank != replicas_of_stage.ranks[0]
                           for name, _ in unwrap_module(self.stages[stage].module).named_parameters()}
        self._slice = StageSlice.of(self._mesh.layout)  # the norm's pieces and where they are summed (norms.py)
        self._calls = CallState(n_microbatches)
        self._watchdog: Watchdog | None = None
        if self.n_ranks > 1:
            agreed = {"schedule": self.schedule.name, "n_stages": pipe.n_stages, "n_microbatches": n_microbatches,
                      "stall_timeout": stall_timeout}
            store, self._store_keep, host = open_store(group, agreed, timeout=min(timeout, 30.0))
            self._watchdog = Watchdog(store, self.rank, self.n_ranks, self._calls, self._executor, self.transport,
                                      stall_timeout=stall_timeout, first_stage=min(self.stages, default=0), host=host)
            weakref.finalize(self, self._watchdog.close)  # a runner dropped unclosed: its peers learn it left

    # --- parameters and state ------------------------------------------------------------------
    @property
    def modules(self) -> list[nn.Module]:
        """The stage modules held by this rank, in stage order."""
        return [unwrap_module(self.stages[index].module) for index in sorted(self.stages)]

    @property
    def mesh(self) -> Any:
        """The ``DeviceMesh`` the runner was built on (None without one); its groups and data-parallel
        size are ``runner.mesh_layout`` (:class:`~conveyor.runtime.mesh.MeshLayout`)."""
        return self._mesh.mesh

    @property
    def mesh_layout(self) -> Any:
        return self._mesh.layout

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

    # --- reductions over the group (entry.py's hooks) --------------------------------------------
    def _any_overflow(self, local: bool) -> bool:
        return overflow_in_group(local, self.group)

    def _counts_in_norm(self, name: str) -> bool:
        if name in self._uncounted:  # a replica other than the first of its stage
            return False
        return name not in self.ties or self.schedule.placement[min(self.ties[name])] == self.rank

    def _norm_piece(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        return counted_piece(grad, self._slice) if self._counts_in_norm(name) else None

    def _reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """Over the pipeline's group, then along each other dimension of the mesh."""
        total = value.reshape(1).clone()
        how = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        for group in (self.group, *self._slice.groups):
            dist.all_reduce(total, op=how, group=group)
        return total[0]

    def _release(self) -> None:
        if self._watchdog is not None:  # first: peers learn this rank left before its connections close
            self._watchdog.close()
            self._watchdog = None
            self._store_keep = None
        self._executor.close()
        close = getattr(self.transport, "close", None)
        if close is not None:
            close()

    # --- running ----------------------------------------------------------------------------------
    def _before_step(self) -> None:
        self._tied.before_step()

    def _prepare(self, inputs: tuple, kwargs: dict, target: Any) -> StepData:
        data = super()._prepare(inputs, kwargs, target)
        if data.training and self._holds_last:  # each loss weighed as a share of every replica's batch
            data.weights = self._mesh.global_weights(data.targets, data.weights, self.loss_weighting,
                                                     self.ignore_index, self.device)
        return data

    def _after_step(self) -> None:
        self._tied.after_step()
        self._mesh.check_gradients(self.stages, self.rank)
        for stage, replicas_of_stage in self._replicas.items():
            replicas_of_stage.sum_gradients(p for p in self.stages[stage].module.parameters() if p.requires_grad)

    def _batch_loss(self, data: StepData) -> torch.Tensor | None:
        loss = None
        if self._holds_last:
            loss, dtype = data.loss_sum()
            if self.pipe.n_stages - 1 in self._replicas:
                loss = self._replicas[self.pipe.n_stages - 1].sum_value(loss.reshape(1))[0]
            loss = self._mesh.global_loss(loss).to(dtype)
        if self.broadcast_loss:
            value = loss if loss is not None else torch.zeros((), device=self.device)
            value = value.to(torch.float32).reshape(1).clone()
            dist.broadcast(value, dist.get_global_rank(self.group, self._last_stage_rank)
                           if self.group is not None else self._last_stage_rank, group=self.group)
            loss = value[0]
        return loss

    def _execute(self, data: StepData) -> None:
        """Run this rank's program for ``data`` (training or forward-only)."""
        if self._auto and data.training:
            self._adopt(choose_schedule(self, data, self._auto_limit))
        for stage in self.stages.values():
            stage.reset_stats()
        executor = self._executor
        executor.loss_scale = self.loss_scale  # fp16 (precision.py): the last stage's loss is scaled
        executor.trace = []
        calls = self._calls
        calls.begin("step" if data.training else "forward")
        try:
            self.transport.expect(self._incoming[data.training])
            run = executor.run
            for step in self._steps[data.training]:
                run(step, data)
            executor.current = None  # finishing sends is no action of this rank
            self.transport.finish()
        except BaseException:
            executor.current = None
            calls.end(failed=True)
            raise
        executor.current = None
        calls.end()

    def _adopt(self, program: Schedule) -> None:
        """Run ``program`` from now on (the same stages on the same ranks)."""
        self._auto = False
        self._mesh.check_schedule(program)
        self.schedule = program
        forward_program = program.forward_only()
        self._incoming = {True: incoming(program, self.rank), False: incoming(forward_program, self.rank)}
        self._steps = {True: steps_of(program, self.rank), False: steps_of(forward_program, self.rank)}
        self._executor.last_backward = last_backwards(program, self.rank)

    def stream(self, batches: Iterable[Any], optimizer: torch.optim.Optimizer) -> Iterator[torch.Tensor]:
        """Train on a stream of ``(inputs, target)`` batches without draining between them
        (asynchronous schedules); ``optimizer`` (built on :meth:`parameters`) is stepped by the
        pipeline's update actions, each applying the mean gradient of the micro-batches since the
        stage's previous update (each micro-batch's loss counts whole). Yields each micro-batch's
        loss, in order, on the last stage's rank (nothing elsewhere). Every rank iterates the same
        batches and consumes the whole generator; the pipeline drains once, when ``batches``
        ends. :attr:`trace` then holds the stream's last ``STREAM_TRACE_LIMIT`` actions,
        :attr:`peak_versions` and :attr:`peak_stashed` its peaks.
        """
        self._check_open()
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
            stage.reset_stats()
        executor = self._executor
        executor.accumulated = {}
        executor.loss_scale = 1.0  # fp16 is refused for schedules that update inside the pipeline
        executor.trace = collections.deque(maxlen=STREAM_TRACE_LIMIT)
        self._calls.begin("stream")
        try:
            self.transport.expect(incoming_stream(self.schedule, self.rank, feed.exists))
            for action in self.schedule.stream(self.rank, feed.exists):
                executor.run(step_of(action, self.schedule), feed)
                if action.kind == FORWARD and action.microbatch in feed.losses:
                    executor.current = None  # the caller's loop body is not this action
                    yield feed.losses.pop(action.microbatch)
            executor.current = None
            self.transport.finish()
        except BaseException:
            self._calls.end(failed=True)
            raise
        else:
            self._calls.end()
        finally:
            executor.current = None
            self._optimizer = None

    # --- generation (generate.py) ------------------------------------------------------------------
    def _generation_held(self) -> dict[int, tuple[nn.Module, torch.device]]:
        if any(len(replicas_of_stage) > 1 for replicas_of_stage in self.schedule.replicas):
            raise ValueError("generate() with replicated stages is not supported: build a runner without replicas")
        return {index: (stage.module, self.device) for index, stage in self.stages.items()}

    def _generate(self, run: GenerationRun, devices: dict[int, torch.device]) -> tuple[torch.Tensor, int]:
        placement = self.schedule.placement
        n_stages, n_lanes, n_steps = run.n_stages, run.n_lanes, run.n_steps
        transport = self.transport

        def receive(action: Decode) -> Any:
            message, source = message_in(action, n_stages, n_lanes)  # type: ignore[misc]
            return transport.receive(message, placement[source])

        def send(action: Decode, value: Any) -> None:
            message, target = message_out(action, n_stages, n_lanes, n_steps)  # type: ignore[misc]
            if placement[target] == self.rank:
                transport.deliver_local(message, value)
            else:
                transport.send(placement[target], message, value)

        self._calls.begin("generate")  # the watchdog names a rank that makes another call meanwhile
        try:
            transport.expect(incoming_messages(n_stages, n_lanes, n_steps, placement.__getitem__, self.rank))
            self._run_generation(run, devices, receive, send)
            transport.finish()
        except BaseException:
            self._calls.end(failed=True)
            raise
        self._calls.end()
        batch, length = run.input_ids.shape[0], run.input_ids.shape[1] + n_steps
        result = torch.zeros((batch, length), dtype=torch.long, device=self.device)
        kept = torch.zeros(1, dtype=torch.long, device=self.device)
        if self._holds_last:
            tokens, count = run.result()
            result.copy_(tokens)
            kept[0] = count
        source = self._last_stage_rank
        source = dist.get_global_rank(self.group, source) if self.group is not None else source
        dist.broadcast(result, source, group=self.group)
        dist.broadcast(kept, source, group=self.group)
        return result, int(kept[0])

    def _update(self, action: Action) -> None:
        """Step the optimizer on the mean gradient accumulated since this stage's last update."""
        stage = self.stages[action.stage]
        if self._optimizer is None or stage.versions is None:
            raise RuntimeError(f"{action} needs an optimizer: run asynchronous schedules with stream()")
        count = self._executor.accumulated.pop(action.stage, 0)
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
