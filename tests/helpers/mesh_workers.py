"""Rank functions for the device-mesh tests: pipelines on a mesh's ``pp`` dimension whose stages
are wrapped by FSDP2, DDP, composable replicate or tensor parallelism, each data-parallel
replica feeding its own (uneven) shard of the batch. Each returns, per configuration, the full
weights of this rank's stages after STEPS optimizer steps and the losses step() returned."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

import conveyor
from conveyor.testing import count_collectives

from models import DTYPE, WIDTH, mlp, mse

STEPS = 3
ROWS = 16
SHARDS = {1: [16], 2: [9, 7], 4: [4, 4, 4, 4]}  # rows per data-parallel replica: uneven, as a real loader's last batch
N_MICROBATCHES = 4


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return (torch.randn(ROWS, WIDTH, dtype=DTYPE, generator=generator),
            torch.randn(ROWS, WIDTH, dtype=DTYPE, generator=generator))


def shard_of(value: torch.Tensor, replica: int, replicas: int) -> torch.Tensor:
    sizes = SHARDS[replicas]
    start = sum(sizes[:replica])
    return value[start:start + sizes[replica]]


class NamedNet(nn.Module):
    """A model with named children (``inp``, ``blocks.0``, ``blocks.1``, ``out``), cut by tracing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.inp = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)
        self.blocks = nn.ModuleList([nn.Linear(WIDTH, WIDTH, dtype=DTYPE) for _ in range(2)])
        self.out = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for block in self.blocks:
            x = torch.tanh(block(x))
        return self.out(x)


def named_pipe() -> conveyor.Pipe:
    return conveyor.pipeline(NamedNet(), split_points=["blocks.1"], example_args=(global_batch(0)[0][:4],))


def reference(steps: int = STEPS, model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """The unsplit model (default: the MLP) trained on the whole batch in one process."""
    model = model if model is not None else mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        x, y = global_batch(step)
        loss = mse(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


# --- what parallelize applies -------------------------------------------------------------------
def _linears(stage: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, child) for name, child in stage.named_children() if isinstance(child, nn.Linear)]


def _tensor_parallel(stage: nn.Module, tp_mesh: Any) -> None:
    """Colwise then Rowwise for each pair of Linear layers; a last unpaired one Colwise with a
    replicated output."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    names = [name for name, _ in _linears(stage)]
    plan: dict[str, Any] = {}
    for position, name in enumerate(names):
        if position % 2 == 0:
            last = position == len(names) - 1
            plan[name] = ColwiseParallel(output_layouts=Replicate()) if last else ColwiseParallel()
        else:
            plan[name] = RowwiseParallel()
    parallelize_module(stage, tp_mesh, plan)


def _fully_shard(stage: nn.Module, dp_mesh: Any, reshard: bool) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for child in [m for m in stage.modules() if isinstance(m, nn.Linear)]:
        fully_shard(child, mesh=dp_mesh, reshard_after_forward=reshard)
    return fully_shard(stage, mesh=dp_mesh, reshard_after_forward=reshard)


def parallelizer(kind: str) -> Callable[[nn.Module, Any], nn.Module]:
    """``fn(stage_module, mesh)`` for a wrapper kind of the matrix."""
    def apply(stage: nn.Module, mesh: Any) -> nn.Module:
        dims = mesh.mesh_dim_names
        dp_mesh = mesh["dp_replicate", "dp_shard"] if "dp_shard" in dims else mesh["dp"] if "dp" in dims else None
        if "tp" in dims:
            _tensor_parallel(stage, mesh["tp"])
        if kind == "fsdp-ac":  # activation checkpointing per layer, then FSDP2 (torchtitan's order)
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            from torch.distributed.fsdp import fully_shard

            for name, child in _linears(stage):
                wrapped = checkpoint_wrapper(child)
                stage.register_module(name, wrapped)
                fully_shard(wrapped, mesh=dp_mesh)
            return fully_shard(stage, mesh=dp_mesh)
        if kind == "fsdp-root":  # the stage as one unit (a traced stage never calls its layers)
            from torch.distributed.fsdp import fully_shard

            return fully_shard(stage, mesh=dp_mesh)
        if kind in ("fsdp", "fsdp-keep", "hsdp"):
            return _fully_shard(stage, dp_mesh, reshard=kind != "fsdp-keep")
        if kind == "ddp":
            return nn.parallel.DistributedDataParallel(stage, process_group=mesh["dp"].get_group())
        if kind == "replicate":
            from torch.distributed._composable.replicate_with_fsdp import replicate

            return replicate(stage, mesh=mesh["dp"])
        if kind == "replicate-ddp":
            from torch.distributed._composable.replicate import replicate as ddp_replicate

            return ddp_replicate(stage, process_group=mesh["dp"].get_group())
        assert kind in ("tp", "plain"), kind
        return stage
    return apply


def _full(tensor: torch.Tensor) -> torch.Tensor:
    full = getattr(tensor, "full_tensor", None)
    return (full() if full is not None else tensor).detach().clone()


def _replica(mesh: Any) -> tuple[int, int]:
    """This rank's data-parallel coordinate and the replica count."""
    dims = mesh.mesh_dim_names
    coordinate = 0
    count = 1
    for name in ("dp_replicate", "dp_shard", "dp"):
        if name in dims:
            size = mesh[name].size()
            coordinate = coordinate * size + mesh[name].get_local_rank()
            count *= size
    return coordinate, count


def train(mesh: Any, schedule: str, kind: str, recompute: bool, n_stages: int = 0, variant: str = "") -> dict:
    """One configuration: STEPS Adam steps on this rank's data shard. ``variant="meta"``: the
    MLP is built on the meta device and materialised by the runner (init_fn copies the
    reference's initial weights), so parallelize sees materialised stages; ``"named"``: the
    traced :class:`NamedNet` instead of the MLP."""
    meta = variant == "meta"
    calls: list[tuple[list[str], bool]] = []

    def parallelize(stage: nn.Module, stage_mesh: Any) -> nn.Module:
        assert not any(p.is_meta for p in stage.parameters())
        calls.append(([name for name, _ in stage.named_children()], stage_mesh is mesh))  # original names
        return parallelizer(kind)(stage, stage_mesh)

    init_fn = None
    if meta:
        initial = mlp().state_dict()
        with torch.device("meta"):
            model = mlp()

        def init_fn(module: nn.Module) -> None:
            with torch.no_grad():
                for name, value in module.state_dict().items():
                    value.copy_(initial[name])
    else:
        model = mlp()
    pipe = named_pipe() if variant == "named" else conveyor.pipeline(model, n_stages=n_stages or mesh["pp"].size())
    runner = conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=parallelize, schedule=schedule,
                                     n_microbatches=N_MICROBATCHES, loss_fn=mse, recompute=recompute,
                                     init_fn=init_fn)
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
    replica, replicas = _replica(mesh)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = global_batch(step)
        losses.append(runner.step(shard_of(x, replica, replicas), target=shard_of(y, replica, replicas)))
        optimizer.step()
    weights = {name: _full(value) for name, value in runner.state_dict().items()}
    names = [name for name, _ in runner.named_parameters()]
    return {"weights": weights, "losses": losses, "names": names, "calls": calls,
            "stages": sorted(runner.stages)}


def matrix(rank: int, world_size: int, sizes: dict[str, int], cases: list[tuple]) -> dict:
    """Every case ``(schedule, kind, recompute[, variant])`` on one mesh."""
    torch.set_num_threads(1)
    mesh = conveyor.mesh(**sizes)
    results = {}
    for case in cases:
        schedule = case[0]
        n_stages = 4 if schedule in ("interleaved-1f1b", "zb-v") else 0
        results[case] = train(mesh, *case[:3], n_stages=n_stages, variant=case[3] if len(case) > 3 else "")
    return results


# --- collective counts -----------------------------------------------------------------------------
def _ddp_counting_hook(state: dict, bucket: Any) -> Any:
    state["all_reduce"] += 1
    tensor = bucket.buffer().div_(dist.get_world_size(state["group"]))
    return dist.all_reduce(tensor, group=state["group"], async_op=True).get_future().then(lambda f: f.value()[0])


# DDP checks the hook's annotations as objects (this module postpones them to strings)
_ddp_counting_hook.__annotations__ = {"state": dict, "bucket": dist.GradBucket,
                                      "return": torch.futures.Future[torch.Tensor]}


def ours_counts(mesh: Any, schedule: str, kind: str, steps: int = 2) -> dict[str, int]:
    """Collectives per step of our runner on this rank (the second step: after lazy init)."""
    hook_state = {"all_reduce": 0, "group": mesh["dp"].get_group()}

    def parallelize(stage: nn.Module, stage_mesh: Any) -> nn.Module:
        module = parallelizer(kind)(stage, stage_mesh)
        if kind == "ddp":
            module.register_comm_hook(hook_state, _ddp_counting_hook)
        return module

    pipe = conveyor.pipeline(mlp(), n_stages=mesh["pp"].size())
    runner = conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=parallelize, schedule=schedule,
                                     n_microbatches=N_MICROBATCHES, loss_fn=mse)
    replica, replicas = _replica(mesh)
    x, y = global_batch(0)
    x, y = shard_of(x, replica, replicas), shard_of(y, replica, replicas)
    runner.step(x, target=y)
    hook_state["all_reduce"] = 0
    with count_collectives() as counts:
        runner.step(x, target=y)
    return {**counts, "all_reduce": hook_state["all_reduce"]}


def torch_counts(mesh: Any, schedule: str) -> dict[str, int]:
    """The same for torch.distributed.pipelining's PipelineStage with the same FSDP2 stages."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import Schedule1F1B, ScheduleGPipe, ScheduleInterleavedZeroBubble

    pp = mesh["pp"]
    pipe = conveyor.pipeline(mlp(), n_stages=pp.size())
    index = pp.get_local_rank()
    module = parallelizer("fsdp")(pipe.stage_module(index), mesh)
    stage = PipelineStage(module, index, pp.size(), torch.device("cpu"), group=pp.get_group())
    kinds = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
    if schedule == "zb-h1":
        torch_schedule: Any = ScheduleInterleavedZeroBubble([stage], N_MICROBATCHES, loss_fn=mse)
    else:
        torch_schedule = kinds[schedule](stage, N_MICROBATCHES, loss_fn=mse)
    replica, replicas = _replica(mesh)
    x, y = global_batch(0)
    x, y = x[replica * 8:(replica + 1) * 8], y[replica * 8:(replica + 1) * 8]  # torch needs even shards

    def run() -> None:
        if index == 0:
            torch_schedule.step(x)
        else:
            torch_schedule.step(target=y)

    run()
    with count_collectives() as counts:
        run()
    return {**counts, "all_reduce": 0}


def collective_counts(rank: int, world_size: int, schedules: list[str]) -> dict:
    torch.set_num_threads(1)
    mesh = conveyor.mesh(pp=2, dp=2)
    out: dict = {}
    for schedule in schedules:
        out[("ours", "fsdp", schedule)] = ours_counts(mesh, schedule, "fsdp")
        out[("ours", "fsdp-keep", schedule)] = ours_counts(mesh, schedule, "fsdp-keep")
        out[("ours", "ddp", schedule)] = ours_counts(mesh, schedule, "ddp")
        out[("torch", "fsdp", schedule)] = torch_counts(mesh, schedule)
    return out


# --- refusals ----------------------------------------------------------------------------------------
def _fully_shard_children(stage: nn.Module, mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for _, child in _linears(stage):
        fully_shard(child, mesh=mesh["dp"])
    return stage


# --- parameters without a gradient ---------------------------------------------------------------
class WithSpare(nn.Module):
    """A stage whose ``spare`` layer is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)
        self.spare = nn.Linear(WIDTH, WIDTH, dtype=DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def spare_step(rank: int, world_size: int, schedule: str, kind: str, unused: list[str]) -> str:
    """One step of pp2 x dp2 stages, stage 1 holding a never-called layer: the error, or "trained"."""
    torch.set_num_threads(1)
    mesh = conveyor.mesh(pp=2, dp=2)
    torch.manual_seed(0)
    pipe = conveyor.pipeline([nn.Sequential(nn.Linear(WIDTH, WIDTH, dtype=DTYPE)), WithSpare()])
    runner = conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=parallelizer(kind), schedule=schedule,
                                     n_microbatches=2, loss_fn=mse, unused_parameters=unused)
    x, y = global_batch(0)
    replica = mesh["dp"].get_local_rank()
    try:
        runner.step(x[replica * 8:(replica + 1) * 8], target=y[replica * 8:(replica + 1) * 8])
    except RuntimeError as error:
        return str(error)
    return "trained"


# --- token-weighted losses ----------------------------------------------------------------------------
def token_target(step: int) -> torch.Tensor:
    """Class labels for the global batch with ignored rows (-100) all in the first replica's shard."""
    generator = torch.Generator().manual_seed(200 + step)
    labels = torch.randint(0, WIDTH, (ROWS,), generator=generator)
    labels[[0, 3, 5, 8]] = -100  # one per micro-batch of the first shard (a micro-batch of only ignored rows is NaN)
    return labels


def token_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(output, target, ignore_index=-100)


def token_reference() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = token_loss(model(global_batch(step)[0]), token_target(step))
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return {k: v.clone() for k, v in model.state_dict().items()}, losses


def token_weighted(rank: int, world_size: int, cases: list[tuple[str, str]]) -> dict:
    """loss_weighting="tokens" on pp2 x dp2: replicas with different counts of counted tokens."""
    torch.set_num_threads(1)
    mesh = conveyor.mesh(pp=2, dp=2)
    replica, replicas = _replica(mesh)
    results = {}
    for schedule, kind in cases:
        runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), mesh=mesh,
                                         parallelize=parallelizer(kind), schedule=schedule,
                                         n_microbatches=N_MICROBATCHES, loss_fn=token_loss, loss_weighting="tokens")
        optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
        losses = []
        for step in range(STEPS):
            optimizer.zero_grad()
            x, y = shard_of(global_batch(step)[0], replica, replicas), shard_of(token_target(step), replica, replicas)
            losses.append(runner.step(x, target=y))
            optimizer.step()
        results[(schedule, kind)] = {"weights": {n: _full(v) for n, v in runner.state_dict().items()},
                                     "losses": losses}
    return results
