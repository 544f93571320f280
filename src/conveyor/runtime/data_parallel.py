"""Data-parallel gradient sync of one stage: once per step, after the stage's last backward.

A stage runs many micro-batches' backwards per step; data parallelism must reduce their summed
gradient once, after the last of them (the last full backward, or under a split backward the
last weight pass, of that stage in this rank's program)::

    1f1b, stage 0 of 2:  F0 F1 B0 F2 B1 F3 B2 B3 | reduce      (B3 is the stage's last backward)
    zb-h1, stage 0:      F0 F1 I0 F2 I1 W0 ... I3 W2 W3 | reduce

One :class:`GradientSync` per local stage, picked from the module ``parallelize`` returned:

- :class:`FSDPSync` (``fully_shard``, ``replicate`` from ``replicate_with_fsdp``): gradient
  sync, reshard-after-backward and is-last-backward are off until the last backward, so the
  unsharded gradients accumulate; then every parameter group reduces once (one reduce-scatter).
- :class:`DDPSync` (``DistributedDataParallel``, the DDP-based composable ``replicate``):
  forwards run under ``no_sync``; the reducer is armed (``prepare_for_backward``) only for the
  last backward, whose hooks all-reduce the accumulated gradients bucket by bucket.
- :class:`PlainSync` (no wrapper; tensor parallel modules): with data-parallel peers on the
  mesh, one all-reduce of the flattened gradients per data-parallel dimension.

Every wrapper averages over the data-parallel replicas; the runner weights each replica's loss
by its share of the global batch so that average is the global mean (``dp_loss_scale``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from ..schedule import Schedule
from ..schedule.actions import BACKWARD, WEIGHT_GRAD, Action
from .mesh import MeshLayout

__all__ = ["GradientSync", "PlainSync", "FSDPSync", "DDPSync", "ComposableReplicateSync", "sync_for",
           "unwrap", "last_backwards", "graph_leaves", "refuse_unsupported", "has_dtensors"]

try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # pragma: no cover - torch without FSDP2
    FSDPModule = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.fsdp import FullyShardedDataParallel as _FSDP1
except ImportError:  # pragma: no cover
    _FSDP1 = None  # type: ignore[assignment,misc]

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch < 2.4
    from torch.distributed._tensor import DTensor  # type: ignore[no-redef]

_REPLICATE_WITH_FSDP: Any
try:
    from torch.distributed._composable.replicate_with_fsdp import ReplicateModule as _ReplicateModule
    from torch.distributed._composable.replicate_with_fsdp import replicate as _REPLICATE_WITH_FSDP
except ImportError:  # pragma: no cover - a torch before the FSDP-based replicate
    _ReplicateModule, _REPLICATE_WITH_FSDP = None, None


def _registry(module: nn.Module) -> dict:
    """The composable APIs applied to ``module`` (``fully_shard``, ``replicate``, ...)."""
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # pragma: no cover
        return {}
    return _get_registry(module) or {}


def _is_ddp_replicate(module: nn.Module) -> bool:
    """The DDP-based composable ``torch.distributed._composable.replicate``."""
    if FSDPModule is not None and isinstance(module, FSDPModule):
        return False
    return "replicate" in _registry(module)


def unwrap(module: nn.Module) -> nn.Module:
    """The module whose names are the unsplit model's: inside ``DistributedDataParallel``.
    FSDP2, composable ``replicate`` and tensor parallelism keep the module (and its names)."""
    while isinstance(module, DistributedDataParallel):
        module = module.module
    return module


def last_backwards(program: Schedule, rank: int) -> set[Action]:
    """Per stage of ``rank``: the last action of its program that accumulates parameter
    gradients (a full backward, or the weight pass of a split backward)."""
    last: dict[int, Action] = {}
    for action in program.ranks[rank]:
        if action.kind in (BACKWARD, WEIGHT_GRAD):
            last[action.stage] = action
    return set(last.values())


def graph_leaves(outputs: Sequence[torch.Tensor], exclude: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The leaf tensors the autograd graph of ``outputs`` accumulates into (its parameters as
    the graph holds them: FSDP2's unsharded parameters), without those in ``exclude``."""
    skip = {id(t) for t in exclude}
    found: dict[int, torch.Tensor] = {}
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in skip and variable.requires_grad:
                found.setdefault(id(variable), variable)
            continue
        stack.extend(next_node for next_node, _ in node.next_functions if next_node is not None)
    return list(found.values())


class GradientSync:
    """The sync policy of one stage (the base class does nothing: one replica, no wrapper)."""

    wrapper = "a plain module"
    wraps_forward = False       # forwards must run under :meth:`forward_context`
    swaps_parameters = False    # the graph's parameter leaves are not ``module.parameters()``

    def __init__(self, module: nn.Module, layout: MeshLayout | None, stage: int) -> None:
        self.module = module
        self.layout = layout
        self.stage = stage

    def forward_context(self) -> AbstractContextManager[Any]:
        return nullcontext()

    def before_backward(self, outputs: Sequence[torch.Tensor], last: bool) -> None:
        """Called before every backward of the stage that accumulates parameter gradients or
        could reduce them (full, input and weight passes); ``last``: the step's last one."""

    def after_last_backward(self) -> None:
        """Reduce the step's accumulated gradients across the data-parallel replicas."""

    def weight_leaves(self, outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The parameter leaves the weight pass of this graph must accumulate into."""
        if self.swaps_parameters:
            return graph_leaves(outputs, inputs)
        return [p for p in self.module.parameters() if p.requires_grad]

    def check_schedule(self, program: Schedule) -> None:
        """Refuse a schedule this wrapper cannot run exactly."""


class PlainSync(GradientSync):
    """No data-parallel wrapper: with peers on the mesh's data dimensions, one all-reduce of the
    stage's flattened gradients per dimension, divided by the number of replicas."""

    def after_last_backward(self) -> None:
        if self.layout is None or not self.layout.data_groups:
            return
        params = [p for p in self.module.parameters() if p.requires_grad]
        grads = []
        for p in params:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            grads.append(grad.to_local() if isinstance(grad, DTensor) else grad)
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        for group in self.layout.data_groups:
            dist.all_reduce(flat, group=group)
        flat.div_(self.layout.data_size)
        offset = 0
        for p, local in zip(params, grads):
            part = flat[offset:offset + local.numel()].view_as(local)
            offset += local.numel()
            if p.grad is None:  # no gradient here: it stays None (an error after the step) unless a peer had one
                if bool(part.any()):
                    p.grad = DTensor.from_local(part.clone(), p.device_mesh, p.placements) if isinstance(p, DTensor) \
                        else part.clone()
            else:
                local.copy_(part)


class FSDPSync(GradientSync):
    """``fully_shard`` (and the FSDP-based ``replicate``): sync deferred to the last backward."""

    swaps_parameters = True

    def __init__(self, module: nn.Module, layout: MeshLayout | None, stage: int) -> None:
        super().__init__(module, layout, stage)
        self.wrapper = "replicate" if _ReplicateModule is not None and isinstance(module, _ReplicateModule) \
            else "fully_shard"
        self._deferred = False

    def _state(self) -> Any:
        if _ReplicateModule is not None and isinstance(self.module, _ReplicateModule):
            return _REPLICATE_WITH_FSDP.state(self.module)
        return self.module._get_fsdp_state()  # type: ignore[operator]

    def _set(self, enabled: bool) -> None:
        module: Any = self.module
        module.set_is_last_backward(enabled)
        module.set_reshard_after_backward(enabled)
        module.set_requires_gradient_sync(enabled)

    def before_backward(self, outputs: Sequence[torch.Tensor], last: bool) -> None:
        if not self._deferred:
            self._set(False)
            self._deferred = True

    def after_last_backward(self) -> None:
        """Every parameter group reduces its accumulated gradient once (FSDP's post-backward,
        which autograd cannot trigger at the right time under split backwards), then FSDP's
        end-of-backward callback waits for the reductions and finalises."""
        self._set(True)
        self._deferred = False
        state = self._state()
        for each in state._state_ctx.all_states:
            groups = getattr(each, "_fsdp_param_groups", None)
            if groups is None:  # pragma: no cover - torch before the list of groups
                group = getattr(each, "_fsdp_param_group", None)
                groups = [group] if group is not None else []
            for group in groups:
                group.post_backward()
        state._root_post_backward_final_callback()


class DDPSync(GradientSync):
    """``DistributedDataParallel``: forwards under ``no_sync``, the reducer armed for the last
    backward only (its hooks then all-reduce the gradients accumulated over the step)."""

    wrapper = "DistributedDataParallel"
    wraps_forward = True

    def _ddp(self) -> DistributedDataParallel:
        assert isinstance(self.module, DistributedDataParallel)
        return self.module

    def forward_context(self) -> AbstractContextManager[Any]:
        return self._ddp().no_sync()

    def before_backward(self, outputs: Sequence[torch.Tensor], last: bool) -> None:
        if last:
            self._ddp().reducer.prepare_for_backward(list(outputs))


class ComposableReplicateSync(DDPSync):
    """The DDP-based composable ``replicate``: the same, through its own switches."""

    wrapper = "replicate"

    def _ddp(self) -> DistributedDataParallel:
        from torch.distributed._composable.replicate import replicate

        return replicate.state(self.module)._ddp

    def forward_context(self) -> AbstractContextManager[Any]:
        return self._no_sync()

    @contextmanager
    def _no_sync(self) -> Iterator[None]:
        module: Any = self.module
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)


def refuse_unsupported(module: nn.Module, stage: int) -> None:
    """Refuse, naming it, a wrapper conveyor cannot drive inside ``module``."""
    where = f"stage {stage}"
    for name, sub in module.named_modules():
        label = f"{where}'s module {name!r}" if name else f"{where}'s module"
        if _FSDP1 is not None and isinstance(sub, _FSDP1):
            raise ValueError(f"{label} is wrapped in FullyShardedDataParallel (FSDP1), which conveyor cannot drive "
                             "micro-batch by micro-batch: use FSDP2, torch.distributed.fsdp.fully_shard")
        if isinstance(sub, nn.DataParallel):
            raise ValueError(f"{label} is wrapped in nn.DataParallel (single-process, multi-thread), which conveyor "
                             "cannot drive: use DistributedDataParallel or fully_shard on the mesh's dp group")
        if name and isinstance(sub, DistributedDataParallel):
            raise ValueError(f"{label} is wrapped in DistributedDataParallel inside the stage: DDP must wrap the "
                             "whole stage module (return DistributedDataParallel(stage_module, ...) from parallelize)")
        if name and _is_ddp_replicate(sub):
            raise ValueError(f"{label} has the DDP-based replicate applied inside the stage: apply replicate to the "
                             "whole stage module")
    _refuse_hooks_a_graph_never_runs(unwrap(module), where)
    if FSDPModule is not None and not isinstance(unwrap(module), FSDPModule):
        inner = [name for name, sub in module.named_modules() if isinstance(sub, FSDPModule)]
        if inner:
            raise ValueError(f"{where}: fully_shard was applied to {inner[:3]} but not to the stage module itself; "
                             "conveyor reduces a stage's gradients through its root: also call "
                             "fully_shard(stage_module, mesh=...) last in parallelize")


def _refuse_hooks_a_graph_never_runs(module: nn.Module, where: str) -> None:
    """A traced stage (an fx graph that reads its submodules' parameters without calling them)
    never runs forward hooks of its submodules, which FSDP2 and tensor parallelism rely on."""
    if not isinstance(module, torch.fx.GraphModule):
        return
    called = {node.target for node in module.graph.nodes if node.op == "call_module"}
    for name, sub in module.named_modules():
        if not name or any(name == c or name.startswith(f"{c}.") for c in called):
            continue
        if (FSDPModule is not None and isinstance(sub, FSDPModule)) or sub._forward_pre_hooks or sub._forward_hooks:
            raise ValueError(f"{where} is a traced graph that reads the parameters of {name!r} without calling it, so "
                             f"the hooks put on {name!r} (fully_shard, parallelize_module, ...) would never run: "
                             "apply fully_shard to the stage module as a whole, or cut the model as an "
                             "nn.Sequential or a list of stage modules to shard or tensor-parallelise its layers")


def sync_for(module: nn.Module, layout: MeshLayout | None, stage: int) -> GradientSync:
    """The sync policy of the stage module ``module`` (as ``parallelize`` returned it)."""
    refuse_unsupported(module, stage)
    if isinstance(module, DistributedDataParallel):
        policy: GradientSync = DDPSync(module, layout, stage)
        group_size = dist.get_world_size(module.process_group)
    elif FSDPModule is not None and isinstance(module, FSDPModule):
        return FSDPSync(module, layout, stage)
    elif _is_ddp_replicate(module):
        policy = ComposableReplicateSync(module, layout, stage)
        group_size = -1  # its DDP is built at the first forward
    else:
        return PlainSync(module, layout, stage)
    data_size = layout.data_size if layout is not None else 1
    if group_size not in (-1, data_size):
        raise ValueError(f"stage {stage}'s {policy.wrapper} averages over {group_size} ranks but the mesh has "
                         f"{data_size} data-parallel replicas: pass process_group=mesh['dp'].get_group()")
    return policy


def has_dtensors(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is a DTensor (FSDP2 or tensor parallel)."""
    return any(isinstance(p, DTensor) for p in module.parameters())
