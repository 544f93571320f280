"""What a runner does differently on a device mesh: the pipeline on ``mesh[pp_dim]``, the
``parallelize`` hook per stage, each stage's data-parallel sync policy, the loss weighted over
all data-parallel replicas, and the refusals of what cannot be run exactly.

Without a mesh every method is a no-op (or returns its argument), so a plain runner pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..schedule import Schedule
from .bundle import flatten
from .data_parallel import has_dtensors, sync_for, unwrap
from .mesh import MeshLayout
from .stage import StageExecutor
from .stage_modules import original_name

__all__ = ["MeshHooks", "GlobalWeights"]

Parallelize = Callable[[nn.Module, Any], "nn.Module | None"]


class MeshHooks:
    """A runner's mesh: resolved once at construction, consulted at a few points of a step."""

    def __init__(self, mesh: Any, pp_dim: str, parallelize: Parallelize | None, group: Any,
                 replicas: Any, unused_parameters: Iterable[str]) -> None:
        self.layout: MeshLayout | None = None
        self.parallelize_fn = parallelize
        self.unused = set(unused_parameters)
        if mesh is None:
            if parallelize is not None:
                raise ValueError("parallelize= needs mesh=: pass the DeviceMesh the stages are parallelised on "
                                 "(e.g. mesh=conveyor.mesh(pp=2, dp=2)); fn(stage_module, mesh) receives it")
            return
        if group is not None:
            raise ValueError("pass mesh= or group=, not both: with a mesh the pipeline runs on the group of "
                             f"its {pp_dim!r} dimension")
        if replicas is not None:
            raise ValueError("replicas= and mesh= cannot be combined: with a mesh, data parallelism is the mesh's "
                             "'dp' dimension (apply fully_shard or DDP in parallelize=)")
        self.layout = MeshLayout.of(mesh, pp_dim)

    @property
    def mesh(self) -> Any:
        return self.layout.mesh if self.layout is not None else None

    def group(self, group: Any) -> Any:
        """The pipeline's process group: ``mesh[pp_dim]``'s, else the one given."""
        return self.layout.pp_group if self.layout is not None else group

    @contextmanager
    def explaining_schedule_errors(self, n_ranks: int) -> Iterator[None]:
        """Name the mesh in a schedule's refusal of the pipeline's rank count."""
        try:
            yield
        except ValueError as error:
            if self.layout is None:
                raise
            raise ValueError(f"the mesh {self.layout.describe()} runs the pipeline on its {self.layout.pp_dim!r} "
                             f"dimension of {n_ranks} ranks, which does not fit the schedule: {error}") from error

    def check_schedule(self, program: Schedule) -> None:
        if self.layout is None:
            return
        if program.is_streaming and (self.layout.data_size > 1 or self.parallelize_fn is not None):
            raise ValueError(f"schedule {program.name!r} updates each stage inside the pipeline, so data-parallel "
                             "and sharded stages cannot sync once per step: use a synchronous schedule (gpipe, "
                             "1f1b, interleaved-1f1b, zb-h1, zb-v) on a mesh")

    def parallelize(self, stage: StageExecutor) -> StageExecutor:
        """Run ``stage``'s module through ``parallelize(module, mesh)``: the stage then runs the
        module it returns (the same one if it returns None)."""
        if self.parallelize_fn is None:
            return stage
        returned = self.parallelize_fn(stage.module, self.mesh)
        if returned is None:
            return stage
        if not isinstance(returned, nn.Module):
            raise TypeError(f"parallelize returned {type(returned).__name__} for stage {stage.index}: return the "
                            "module to run (e.g. fully_shard(stage_module, mesh=...)), or None to keep it")
        stage.module = returned
        return stage

    def attach(self, stages: dict[int, StageExecutor], program: Schedule, ties: dict[str, list[int]]) -> None:
        """Give each local stage its sync policy; refuse what cannot be run exactly."""
        if self.layout is None:
            return
        for index, stage in stages.items():
            policy = sync_for(stage.module, self.layout, index)
            policy.check_schedule(program)
            stage.sync = policy
        if ties and any(has_dtensors(stage.module) for stage in stages.values()):
            raise ValueError(f"parameters tied across stages ({sorted(ties)[:3]}) cannot be summed once they are "
                             "sharded DTensors (FSDP2, tensor parallel): untie them, or keep tied modules unsharded")

    def global_weights(self, targets: list[Any], weights: list[float], mode: str, ignore_index: int,
                       device: torch.device) -> Sequence[float]:
        """Each micro-batch's loss weight as a share of the global batch (all data-parallel replicas,
        each feeding its own shard), times the replica count the wrappers average over. The count's
        all-reduce is started here and waited for when the first weight is read (the first loss):
        the step's first forwards do not wait on it."""
        layout = self.layout
        if layout is None or not layout.data_groups:
            return weights
        return GlobalWeights(_counts(targets, mode, ignore_index), layout.data_groups, layout.data_size, device)

    def global_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The global mean loss from this replica's weighted sum (weights of :meth:`global_weights`)."""
        layout = self.layout
        if layout is None or not layout.data_groups:
            return loss
        total = loss.detach().to(torch.float64).reshape(1).clone()
        for group in layout.data_groups:
            dist.all_reduce(total, group=group)
        return total[0] / layout.data_size

    def check_unused_names(self, pipe: Any) -> None:
        """``unused_parameters`` must name parameters of the pipe (of any stage)."""
        if not self.unused:
            return
        known = {name for index in range(pipe.n_stages) for name, _ in pipe.stage_module(index).named_parameters()}
        unknown = sorted(self.unused - known)
        if unknown:
            raise ValueError(f"unused_parameters names {unknown[:5]}, which the model does not have: use the unsplit "
                             "model's parameter names (model.named_parameters())")

    def check_gradients(self, stages: dict[int, StageExecutor], rank: int) -> None:
        """A trainable parameter with no gradient after a step is an error (a zero-bubble weight
        pass that missed the graph's parameters, or a layer never called), unless marked unused."""
        for index, stage in stages.items():
            for wrapped_name, parameter in unwrap(stage.module).named_parameters():
                name = original_name(wrapped_name)
                if parameter.requires_grad and parameter.grad is None and name not in self.unused:
                    raise RuntimeError(f"rank {rank}, stage {index}: parameter {name!r} requires grad but got no "
                                       "gradient in this step; if it is unused by design, pass "
                                       f"unused_parameters=[{name!r}] to PipelineRunner or set requires_grad=False")


class GlobalWeights(Sequence[float]):
    """Loss weights whose global denominator is being summed over the data-parallel groups: the
    first group's all-reduce runs in the background from construction; the first read waits for
    it (then sums over any further groups, in order) and fixes every weight."""

    def __init__(self, counts: list[float], groups: Sequence[Any], data_size: int, device: torch.device) -> None:
        self._counts = counts
        self._groups = list(groups)
        self._data_size = data_size
        self._total = torch.tensor([sum(counts)], dtype=torch.float64, device=device)
        self._work: Any = dist.all_reduce(self._total, group=self._groups[0], async_op=True)
        self._weights: list[float] | None = None

    def _resolve(self) -> list[float]:
        if self._weights is None:
            self._work.wait()
            for group in self._groups[1:]:
                dist.all_reduce(self._total, group=group)
            scale = self._data_size / float(self._total[0])
            self._weights = [count * scale for count in self._counts]
        return self._weights

    def __getitem__(self, index: Any) -> Any:
        return self._resolve()[index]

    def __len__(self) -> int:
        return len(self._counts)


def _counts(targets: list[Any], mode: str, ignore_index: int) -> list[float]:
    if mode == "rows":
        return [float(flatten(t, "target")[1][0].shape[0]) for t in targets]
    return [float(sum(int((x != ignore_index).sum()) for x in flatten(t, "target")[1])) for t in targets]
