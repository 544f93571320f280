"""What PipelineRunner and LocalPipeline share above the executor core: argument checks,
``step()`` and ``forward()``, gradient clipping, the trace, ``close()``.

A host class calls :meth:`PipelineEntry._keep` and sets ``schedule``, its executors
(``_executors``), where inputs and targets go (``_inputs_to``/``_targets_to``, None where it
holds no first/last stage) and overrides a few hooks:
``_execute`` (run the program), ``_before_step``/``_after_step`` (tied and replicated
gradients), ``_batch_loss``, ``_counts_in_norm`` (or ``_norm_piece``, the part of a gradient
counted here: a shard of a DTensor) and ``_reduce`` (a reduction over every rank of the
pipeline, its data- and tensor-parallel peers included: all-reduces, or nothing in one process).
"""

from __future__ import annotations

import inspect
from abc import abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConveyorError, PipelineError
from ..partition.pipe import Pipe, materialize
from ..schedule import SCHEDULES, Schedule
from .executor import Executor, TraceEvent
from .feed import StepData
from .generate import Decode, GenerationRun, message_in, message_out
from .microbatch import merge
from .precision import LossScaler, ScaledStep, autocast_for
from .stage import LossFn, StageExecutor
from .stage_modules import StageModules

__all__ = ["PipelineEntry", "check_arguments", "check_options"]

LOSS_WEIGHTINGS = ("rows", "tokens")
_GENERATOR_ARGUMENTS = ("n_ranks", "n_stages", "n_microbatches")


def check_arguments(n_microbatches: int, loss_weighting: str) -> None:
    """The argument checks both entry points make before building anything."""
    if n_microbatches < 1:
        raise ValueError(f"n_microbatches must be at least 1, got {n_microbatches}")
    if loss_weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss_weighting={loss_weighting!r} is not one of 'rows', 'tokens'")


def check_options(owner: type, schedule: str | Schedule, options: Mapping[str, Any]) -> None:
    """Refuse an option that neither ``owner`` nor the named schedule's generator takes (a
    misspelt option would otherwise surface as the generator's own TypeError)."""
    if not options or not isinstance(schedule, str) or schedule not in SCHEDULES:
        return  # make_schedule names an unknown schedule, and refuses options for a Schedule object
    takes = [name for name in inspect.signature(SCHEDULES[schedule]).parameters if name not in _GENERATOR_ARGUMENTS]
    own = [name for name, parameter in inspect.signature(owner.__init__).parameters.items()
           if parameter.kind is inspect.Parameter.KEYWORD_ONLY]
    for name in options:
        if name not in takes:
            raise TypeError(f"{owner.__name__} got an unexpected option {name!r}; runner options: {', '.join(own)}; "
                            f"schedule {schedule!r} takes: {', '.join(takes) or 'no options'}")


class PipelineEntry(StageModules, ScaledStep):
    """The public entry points' shared half (see the module docstring for the host's part)."""

    schedule: Schedule
    n_microbatches: int
    loss_fn: LossFn | None
    loss_weighting: str
    ignore_index: int
    _executors: list[Executor]
    _inputs_to: torch.device | None
    _targets_to: torch.device | None
    _norm_device = torch.device("cpu")  # where the norm's partial sums meet (the reduction's device)
    _closed = False

    # --- hooks ---------------------------------------------------------------------------------
    @abstractmethod
    def _execute(self, data: StepData) -> None:
        """Run this process's program for ``data`` (training or forward-only)."""

    def _before_step(self) -> None:
        """Before a training step's program (tied gradients set aside)."""

    def _after_step(self) -> None:
        """After a training step's program (tied and replicated gradients combined)."""

    def _batch_loss(self, data: StepData) -> torch.Tensor | None:
        """The step's return value: the weighted sum of the micro-batch losses held here."""
        total, dtype = data.loss_sum()
        return total.to(dtype)

    def _counts_in_norm(self, name: str) -> bool:
        """Whether this copy of parameter ``name`` is the one counted in the pipeline's norm."""
        return True

    def _norm_piece(self, name: str, grad: torch.Tensor) -> torch.Tensor | None:
        """The part of parameter ``name``'s gradient counted here in the global norm (None: no part)."""
        return grad.detach() if self._counts_in_norm(name) else None

    def _reduce(self, value: torch.Tensor, op: str) -> torch.Tensor:
        """``value`` reduced (``"sum"`` or ``"max"``) over every process of the pipeline."""
        return value

    # --- shared --------------------------------------------------------------------------------
    def _keep(self, pipe: Pipe, n_microbatches: int, loss_fn: LossFn | None, *, loss_weighting: str,
              ignore_index: int, detect_anomaly: bool, precision: str, recompute: bool) -> None:
        """Record the options both entry points keep (checked by :func:`check_arguments`)."""
        self.pipe, self.n_microbatches, self.loss_fn = pipe, n_microbatches, loss_fn
        self.loss_weighting, self.ignore_index = loss_weighting, ignore_index
        self.detect_anomaly, self.precision, self.recompute = detect_anomaly, precision, recompute
        self.scaler: LossScaler | None = LossScaler() if precision == "fp16" else None

    def _make_stage(self, index: int, device: torch.device, init_fn: Callable[[nn.Module], None] | None
                    ) -> StageExecutor:
        """Stage ``index`` of the pipe, materialised on ``device``, with the kept options."""
        module = materialize(self.pipe.stage_module(index), device, init_fn)
        stage = StageExecutor(index, module, is_first=index == 0, is_last=index == self.pipe.n_stages - 1,
                              loss_fn=self.loss_fn, recompute=self.recompute, device=device)
        stage.precision_context = autocast_for(self.precision, device)
        return stage

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"this {type(self).__name__} is closed: build a new one to run more steps")

    def _release(self) -> None:
        """What :meth:`close` frees (the transport)."""

    def close(self) -> None:
        """Release what the pipeline holds (its connections); later calls raise. Idempotent."""
        if not self._closed:
            self._closed = True
            self._release()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def trace(self) -> list[TraceEvent]:
        """Every action run here in the last step (or a stream's last ``STREAM_TRACE_LIMIT``), by start."""
        events = [TraceEvent(executor.rank, *event) for executor in self._executors for event in executor.trace]
        if len(self._executors) > 1:
            events.sort(key=lambda event: event.start)
        return events

    def _prepare(self, inputs: tuple, kwargs: dict, target: Any) -> StepData:
        return StepData.cut(inputs, kwargs, target, self.n_microbatches, inputs_to=self._inputs_to,
                            targets_to=self._targets_to, loss_weighting=self.loss_weighting,
                            ignore_index=self.ignore_index)

    def step(self, *inputs: Any, target: Any = None, **kwargs: Any) -> torch.Tensor | None:
        """Forward and backward of the whole batch; gradients accumulate in :meth:`parameters`.

        Returns the batch's mean loss where the last stage is held (on its device), None elsewhere.
        """
        self._check_open()
        if self.loss_fn is None:
            raise ValueError(f"step() trains and needs a loss: pass loss_fn=... to {type(self).__name__} "
                             "(or call forward() for inference)")
        if target is None:
            raise ValueError("loss_fn needs a target: call step(inputs..., target=labels)")
        if self.schedule.is_streaming:
            raise ValueError(f"schedule {self.schedule.name!r} updates the weights inside the pipeline: train "
                             "with runner.stream(batches, optimizer) instead of step()")
        data = self._prepare(inputs, kwargs, target)
        self._unscaled = False  # precision.py: this step's gradients are still scaled
        self._before_step()
        self._execute(data)
        self._after_step()
        return self._batch_loss(data)

    @torch.no_grad()
    def forward(self, *inputs: Any, **kwargs: Any) -> Any:
        """Forward-only pipeline (no autograd graph). Returns the merged output of the last stage
        where it is held, None elsewhere."""
        self._check_open()
        if len(self.schedule.replicas[-1]) > 1:
            raise ValueError("forward() with a replicated last stage is not supported: build an inference "
                             "runner without replicas on the last stage")
        data = self._prepare(inputs, kwargs, None)
        self._execute(data)
        if self._targets_to is None:
            return None
        return merge([data.outputs[i] for i in range(self.n_microbatches)])

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 attention_mask: torch.Tensor | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, generator: torch.Generator | None = None,
                 n_microbatches: int | None = None) -> torch.Tensor:
        """Generate up to ``max_new_tokens`` tokens after each prompt of ``input_ids`` (a Hugging
        Face decoder-only causal LM's pipe); returns ``[batch, prompt + new]`` token ids on every
        process, as ``model.generate`` does.

        The prompts are prefilled through the pipeline, then decoded with a key/value cache on
        every stage for its own layers; the batch is cut into ``n_microbatches`` lanes (default:
        one per stage) that are in flight at once (docs/generation.md). Greedy by default;
        ``do_sample=True`` samples after ``temperature``, ``top_k`` and ``top_p``, drawing from
        ``generator`` (seeded: deterministic) on the last stage. A sequence that produced
        ``eos_token_id`` (default: the model's) continues with ``pad_token_id``. Pass
        ``attention_mask`` for left-padded prompts. Every process makes the same call.
        """
        from ..partition.hf import generation_stages

        self._check_open()
        model = getattr(self.pipe, "model", None)
        if model is None:
            raise ValueError("generate() needs a pipe cut from a Hugging Face causal LM by conveyor.pipeline(model, "
                             "...): it rebuilds each stage from the model's own modules to keep a cache")
        settings = getattr(model, "generation_config", None)
        if eos_token_id is None and settings is not None:
            eos_token_id = settings.eos_token_id
        if pad_token_id is None and settings is not None:
            pad_token_id = settings.pad_token_id
        n_lanes = n_microbatches if n_microbatches is not None else min(int(input_ids.shape[0]), self.pipe.n_stages)
        held = self._generation_held()
        devices = {index: device for index, (_, device) in held.items()}
        stages = generation_stages(model, {index: module for index, (module, _) in held.items()},
                                   [self.pipe.stage_module(i) for i in range(self.pipe.n_stages)], devices)
        run = GenerationRun(stages, self.pipe.n_stages, input_ids, attention_mask, max_new_tokens, n_lanes,
                            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                            eos_token_id=eos_token_id, pad_token_id=pad_token_id, generator=generator)
        result, kept = self._generate(run, devices)
        return result[:, :input_ids.shape[1] + kept].to(input_ids.device)

    @abstractmethod
    def _generation_held(self) -> dict[int, tuple[nn.Module, torch.device]]:
        """The stages held here for generation: index -> (module, device)."""

    @abstractmethod
    def _generate(self, run: GenerationRun, devices: dict[int, torch.device]) -> tuple[torch.Tensor, int]:
        """Run ``run``'s actions held here; return the result and kept length on every process."""

    def _run_generation(self, run: GenerationRun, devices: dict[int, torch.device],
                        receive: Callable[[Decode], Any], send: Callable[[Decode, Any], None]) -> None:
        """Run the actions held here in program order; ``receive``/``send`` move the values."""
        n_stages, n_lanes, n_steps = run.n_stages, run.n_lanes, run.n_steps
        for action in run.actions():
            try:
                value = receive(action) if message_in(action, n_stages, n_lanes) is not None else None
                output = run.run(action, value, devices[action.stage])
                if message_out(action, n_stages, n_lanes, n_steps) is not None:
                    send(action, output)
            except ConveyorError:
                raise
            except Exception as error:
                raise PipelineError(f"{type(error).__name__}: {error}", rank=getattr(self, "rank", 0),
                                    stage=action.stage, microbatch=action.lane, action=str(action)) from error

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip every gradient by the norm over all stages of the pipeline and all shards of its
        gradients (a tied parameter, and a DTensor's replicated copies, counted once); returns
        that norm, a 0-dim float64 tensor with the same value on every rank (torch's
        ``clip_grad_norm_`` of the unsplit model, computed in float64)."""
        self._check_open()
        grads: list[torch.Tensor] = []
        counted: list[torch.Tensor] = []
        seen: set[str] = set()
        for name, parameter in self.named_parameters():
            if parameter.grad is None:
                continue
            grads.append(parameter.grad)
            if name not in seen:
                seen.add(name)
                piece = self._norm_piece(name, parameter.grad)
                if piece is not None and piece.numel():
                    counted.append(piece)
        device, zero = self._norm_device, torch.tensor(0.0, dtype=torch.float64, device=self._norm_device)
        if norm_type == float("inf"):
            norm = self._reduce(max((g.abs().max().to(device, torch.float64) for g in counted), default=zero), "max")
        else:
            parts: Iterable[torch.Tensor] = (g.double().abs().pow(norm_type).sum().to(device) for g in counted)
            norm = self._reduce(sum(parts, zero), "sum") ** (1.0 / norm_type)
        scale = max_norm / (float(norm) + 1e-6)
        if scale < 1.0:
            for grad in grads:
                grad.mul_(scale)
        return norm
