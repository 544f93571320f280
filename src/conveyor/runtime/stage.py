"""One stage on one rank: forward, backward (whole or split into I and W), activation stash,
re-materialisation with replayed randomness."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.func import functional_call

from .bundle import detached_leaves, flatten
from .compiled import is_compiled
from .data_parallel import GradientSync
from .versions import WeightVersions

__all__ = ["ENGINE_SIGNATURE", "StageExecutor", "engine_entry"]

_P = inspect.Parameter
# The private entry torch.autograd.backward and .grad call after checking their arguments: a pass-
# through ``(t_outputs, *args, **kwargs)`` to the engine's run_backward, whose remaining arguments we
# pass by keyword. Any other signature means the private path changed: use the public functions.
ENGINE_SIGNATURE = (("t_outputs", _P.POSITIONAL_OR_KEYWORD), ("args", _P.VAR_POSITIONAL),
                    ("kwargs", _P.VAR_KEYWORD))


def engine_entry(candidate: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``candidate`` if its parameters are exactly :data:`ENGINE_SIGNATURE` (names, kinds and
    order), else None (the public autograd functions are used then)."""
    if candidate is None:
        return None
    try:
        parameters = inspect.signature(candidate).parameters.values()
    except (TypeError, ValueError):
        return None
    return candidate if tuple((p.name, p.kind) for p in parameters) == ENGINE_SIGNATURE else None


_engine_run_backward = engine_entry(getattr(torch.autograd.graph, "_engine_run_backward", None))

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass
class _Stashed:
    """What the backward of one micro-batch needs."""

    args: tuple                       # the stage's call arguments (detached leaves)
    kwargs: dict
    input_leaves: list[torch.Tensor]  # every tensor of the stage input; their grads go upstream
    outputs: list[torch.Tensor] = field(default_factory=list)  # every output tensor (or the loss)
    output_grads: list[torch.Tensor | None] | None = None      # kept between I and W
    weight_leaves: list[torch.Tensor] = field(default_factory=list)  # the graph's parameters, taken at I
    target: Any = None
    weight: float = 1.0
    rng_state: tuple | None = None
    version: int | None = None       # the stashed weight version it runs with (async schedules)


def _run_engine(outputs: list[torch.Tensor], grads: list[torch.Tensor] | None, *, inputs: tuple = (),
                keep_graph: bool = False, accumulate: bool = True) -> tuple:
    """``torch.autograd.backward`` (``accumulate``) or ``torch.autograd.grad`` (not, returning
    the gradients of ``inputs``, None where unused), calling the engine directly where its entry
    has the expected signature: the public functions' argument checks cost time on every backward
    of the critical path (docs/architecture.md). Both paths skip unreachable inputs alike (their
    gradient stays None); the engine still checks each gradient's shape against its output.
    ``grads`` None: scalar losses."""
    if grads is None:
        grads = [torch.ones_like(output) for output in outputs]
    if _engine_run_backward is None:
        if accumulate:
            torch.autograd.backward(outputs, grads, inputs=list(inputs) or None)
            return ()
        return torch.autograd.grad(outputs, inputs, grads, retain_graph=keep_graph, allow_unused=True)
    return _engine_run_backward(tuple(outputs), grad_tensors=tuple(grads), keep_graph=keep_graph, create_graph=False,
                                inputs=tuple(inputs), allow_unreachable=True, accumulate_grad=accumulate)


@contextmanager
def _replayed_rng(state: tuple, device: torch.device) -> Iterator[None]:
    """Run the body with the random state ``state`` without disturbing the global stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class StageExecutor:
    """Runs the actions of one stage module and keeps what its backward needs."""

    def __init__(self, index: int, module: nn.Module, *, is_first: bool, is_last: bool,
                 loss_fn: LossFn | None, recompute: bool, device: torch.device) -> None:
        self.index = index
        self.module = module
        self.is_first = is_first
        self.is_last = is_last
        self.loss_fn = loss_fn
        self.recompute = recompute
        self.device = device
        self._stash: dict[int, _Stashed] = {}
        self.peak_stashed = 0
        self.versions: WeightVersions | None = None  # set for schedules that update weights themselves
        self.precision_context: Callable[[], AbstractContextManager[Any]] = nullcontext  # autocast (precision.py)
        self._output_where = f"stage {index} output"
        self.sync = GradientSync(module, None, index)  # data-parallel sync (data_parallel.py), set by the runner
        self._whole: tuple[nn.Module, bool] | None = None  # (module, whether I must run its whole backward)

    # --- helpers -----------------------------------------------------------------------------
    def _rng_state(self) -> tuple:
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return torch.get_rng_state(), cuda

    def _call(self, args: tuple, kwargs: dict, version: int | None = None) -> Any:
        if self.sync.wraps_forward:  # DDP: forwards never arm the reducer (data_parallel.py)
            with self.sync.forward_context():
                return self._call_module(args, kwargs, version)
        return self._call_module(args, kwargs, version)

    def _call_module(self, args: tuple, kwargs: dict, version: int | None) -> Any:
        if self.precision_context is nullcontext and version is None:  # the usual case, with the least work
            return self.module(*args, **kwargs)
        with self.precision_context():
            if version is None or self.versions is None:
                return self.module(*args, **kwargs)
            return functional_call(self.module, self.versions.weights(version), args, kwargs)

    def _loss(self, output: Any, target: Any, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.loss_fn is not None
        with self.precision_context():
            loss = self.loss_fn(output, target)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"loss_fn returned {shape}, not a scalar tensor: reduce it to one number "
                             "(e.g. reduction='mean')")
        loss = loss.reshape(())
        return loss, loss * weight

    def _output_tensors(self, output: Any) -> list[torch.Tensor]:
        return flatten(output, self._output_where)[1]

    def _check_differentiable(self, outputs: list[torch.Tensor], stashed: _Stashed) -> None:
        if any(t.requires_grad for t in outputs):  # the usual case, decided without walking the module
            return
        trainable = (any(p.requires_grad for p in self.module.parameters())
                     or any(leaf.requires_grad for leaf in stashed.input_leaves))
        if trainable:
            what = "loss" if self.is_last else "output"
            raise RuntimeError(f"the stage's {what} does not require grad, so no gradient can flow back: "
                               "do not detach it or compute it under torch.no_grad()")

    def _store(self, microbatch: int, stashed: _Stashed) -> None:
        self._stash[microbatch] = stashed
        self.peak_stashed = max(self.peak_stashed, len(self._stash))

    @property
    def whole_backward(self) -> bool:
        """Whether a split backward runs whole at I time, W doing nothing: a compiled module's
        backward cannot be split (``compiled.py``)."""
        if self._whole is None or self._whole[0] is not self.module:
            self._whole = (self.module, is_compiled(self.module))
        return self._whole[1]

    @property
    def stashed(self) -> int:
        return len(self._stash)

    def reset_stats(self) -> None:
        self.peak_stashed = len(self._stash)

    # --- actions -----------------------------------------------------------------------------
    def forward(self, microbatch: int, args: tuple, kwargs: dict, *, target: Any = None,
                weight: float = 1.0, training: bool = True, version: int | None = None,
                fresh: bool = False) -> Any:
        """Run the forward of ``microbatch`` (on weight ``version`` when weights are stashed).
        Returns the output to send downstream, or (last stage, training) the unweighted loss,
        detached. ``fresh``: ``args`` already are leaves of their own (received from the
        transport) and ``kwargs`` is empty, so nothing needs detaching."""
        if not training:
            with torch.no_grad():
                return self._call(args, kwargs)
        if fresh:
            input_leaves, kwarg_leaves = flatten(args, "stage input")[1], []
        else:
            args, input_leaves = detached_leaves(args, "stage input")
            kwargs, kwarg_leaves = detached_leaves(kwargs, "stage input") if kwargs else (kwargs, [])
        stashed = _Stashed(args, kwargs, input_leaves + kwarg_leaves, target=target, weight=weight)
        if self.recompute:
            stashed.rng_state = self._rng_state()
        if version is not None and self.versions is not None:
            self.versions.acquire(version)
            stashed.version = version
        output = self._call(args, kwargs, stashed.version)
        if self.is_last:
            loss, weighted = self._loss(output, target, weight)
            outputs, result = [weighted], loss.detach()
        else:
            outputs, result = self._output_tensors(output), output
        self._check_differentiable(outputs, stashed)
        if not self.recompute:  # with recompute the graph dies here and is rebuilt in the backward
            stashed.outputs = outputs
        self._store(microbatch, stashed)
        return result

    def _rematerialise(self, stashed: _Stashed) -> None:
        if not self.recompute or stashed.outputs:
            return
        assert stashed.rng_state is not None
        with _replayed_rng(stashed.rng_state, self.device):
            output = self._call(stashed.args, stashed.kwargs, stashed.version)
            if self.is_last:
                stashed.outputs = [self._loss(output, stashed.target, stashed.weight)[1]]
            else:
                stashed.outputs = self._output_tensors(output)

    def _pairs(self, stashed: _Stashed, output_grads: list | None) -> tuple[list, list]:
        """The outputs to differentiate and their incoming gradients (pairs without one dropped)."""
        if self.is_last:
            return stashed.outputs, [None] * len(stashed.outputs)
        grads = list(output_grads or [])
        if len(grads) != len(stashed.outputs):
            raise RuntimeError(f"received {len(grads)} output gradients for {len(stashed.outputs)} outputs")
        pairs = [(o, g) for o, g in zip(stashed.outputs, grads) if g is not None and o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    @staticmethod
    def _input_grads(stashed: _Stashed) -> list[torch.Tensor | None]:
        return [leaf.grad if leaf.requires_grad else None for leaf in stashed.input_leaves]

    def backward(self, microbatch: int, output_grads: list | None, last: bool = False) -> list[torch.Tensor | None]:
        """Full backward of ``microbatch``: accumulates parameter gradients and returns the
        gradients of the stage's inputs (one per input that requires grad; None if unused).
        ``last``: the stage's last backward of the step, after which data parallelism syncs."""
        stashed = self._stash.pop(microbatch)
        self._rematerialise(stashed)
        outputs, grads = self._pairs(stashed, output_grads)
        self.sync.before_backward(outputs, last)
        if outputs:
            _run_engine(outputs, None if self.is_last else grads)
        if last:
            self.sync.after_last_backward()
        if stashed.version is not None and self.versions is not None:
            self.versions.release(stashed.version)
        return self._input_grads(stashed)

    def backward_job(self, microbatch: int, output_grads: list | None, split: bool,
                     last: bool = False) -> Callable[[], list[torch.Tensor | None]]:
        """The backward of ``microbatch`` (``split``: only its input half, as :meth:`backward_input`)
        as a function that another thread may run while this one runs a forward (an F&B pair).
        What touches the stash, the random state (recompute replays it) or the data-parallel
        hooks happens here, now; the function only runs the autograd engine on this
        micro-batch's own graph. After it, call :meth:`backward_job_done` on this thread."""
        stashed = self._stash[microbatch] if split else self._stash.pop(microbatch)
        self._rematerialise(stashed)
        outputs, grads = self._pairs(stashed, output_grads)
        whole = not split or self.whole_backward
        if split and whole:  # a compiled stage: the whole backward now, W finds nothing left
            stashed.outputs, stashed.weight_leaves = [], []
        elif split:
            stashed.outputs, stashed.output_grads = outputs, grads
            stashed.weight_leaves = self.sync.weight_leaves(outputs, stashed.input_leaves)
        self.sync.before_backward(outputs, last and not split)
        wanted = tuple(leaf for leaf in stashed.input_leaves if leaf.requires_grad)
        given = None if self.is_last else grads

        def run() -> list[torch.Tensor | None]:
            if whole:
                if outputs:
                    _run_engine(outputs, given)
                return self._input_grads(stashed)
            if not outputs or not wanted:
                return [None] * len(stashed.input_leaves)
            found = iter(_run_engine(outputs, given, inputs=wanted, keep_graph=True, accumulate=False))
            return [next(found) if leaf.requires_grad else None for leaf in stashed.input_leaves]

        return run

    def backward_job_done(self, last: bool) -> None:
        """After a :meth:`backward_job` of a whole backward: the data-parallel sync if it was the last."""
        if last:
            self.sync.after_last_backward()

    def backward_input(self, microbatch: int, output_grads: list | None) -> list[torch.Tensor | None]:
        """First half of a split backward: only the gradients of the stage's inputs (a compiled
        stage: the whole backward, see :attr:`whole_backward`)."""
        stashed = self._stash[microbatch]
        self._rematerialise(stashed)
        if self.whole_backward:
            return self._whole_input(stashed, output_grads)
        stashed.outputs, stashed.output_grads = self._pairs(stashed, output_grads)
        stashed.weight_leaves = self.sync.weight_leaves(stashed.outputs, stashed.input_leaves)
        self.sync.before_backward(stashed.outputs, False)
        wanted = [leaf for leaf in stashed.input_leaves if leaf.requires_grad]
        if not stashed.outputs or not wanted:
            return [None] * len(stashed.input_leaves)
        grads = None if self.is_last else stashed.output_grads
        found = iter(_run_engine(stashed.outputs, grads, inputs=tuple(wanted), keep_graph=True, accumulate=False))
        return [next(found) if leaf.requires_grad else None for leaf in stashed.input_leaves]

    def _whole_input(self, stashed: _Stashed, output_grads: list | None) -> list[torch.Tensor | None]:
        """I of a compiled stage: the whole backward now, weight gradients included; W then finds
        no graph left (``outputs`` empty) and only does the data-parallel sync if it is the last."""
        outputs, grads = self._pairs(stashed, output_grads)
        self.sync.before_backward(outputs, False)
        if outputs:
            _run_engine(outputs, None if self.is_last else grads)
        stashed.outputs, stashed.weight_leaves = [], []
        return self._input_grads(stashed)

    def backward_weight(self, microbatch: int, last: bool = False) -> None:
        """Second half of a split backward: accumulate the gradients of the parameter leaves the
        graph held when the input gradients were taken (under FSDP2 the unsharded parameters,
        not the sharded ones ``module.parameters()`` returns by now), free the graph."""
        stashed = self._stash.pop(microbatch)
        params = stashed.weight_leaves
        self.sync.before_backward(stashed.outputs, last)
        if stashed.outputs and params:
            grads = None if self.is_last else stashed.output_grads
            _run_engine(stashed.outputs, grads, inputs=tuple(params))
        if last:
            self.sync.after_last_backward()
