"""Building a runner on a device mesh: ``conveyor.mesh``, the pipeline dimension, and what is
refused at construction, each with an error naming the problem and the fix (one-rank process
group: nothing here needs a peer)."""

from __future__ import annotations

from typing import Any

import pytest
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

import conveyor

import mesh_workers
from models import TiedLM, mlp, mse, tied_pipe, token_loss

OPTIONS: dict[str, Any] = {"schedule": "1f1b", "n_microbatches": 2, "loss_fn": mse}


def _pipe(n_stages: int = 1) -> conveyor.Pipe:
    return conveyor.pipeline(mlp(), n_stages=n_stages)


def test_conveyor_mesh_orders_dimensions_like_torchtitan(one_rank_group: None) -> None:
    mesh = conveyor.mesh(tp=1, dp=1, pp=1)
    assert mesh.mesh_dim_names == ("pp", "dp", "tp")
    assert mesh.device_type == "cpu"


def test_conveyor_mesh_whose_sizes_do_not_multiply_to_the_world_is_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="pp2 x dp2 has 4 ranks but the job has 1"):
        conveyor.mesh(pp=2, dp=2)


def test_unknown_mesh_dimensions_are_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"unknown mesh dimension\(s\) \['cp'\]"):
        conveyor.mesh(pp=1, cp=1)
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("pp", "cp"))
    with pytest.raises(ValueError, match=r"\['cp'\] are neither the pipeline"):
        conveyor.PipelineRunner(_pipe(), mesh=mesh, **OPTIONS)


def test_a_mesh_without_the_pipeline_dimension_is_refused(one_rank_group: None) -> None:
    mesh = init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))
    with pytest.raises(ValueError, match="no dimension 'pp'.*pp_dim="):
        conveyor.PipelineRunner(_pipe(), mesh=mesh, **OPTIONS)


def test_mesh_and_group_together_are_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="mesh= or group=, not both"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), group=dist.group.WORLD, **OPTIONS)


def test_a_pp_dimension_that_does_not_fit_the_schedule_is_refused_naming_the_mesh(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="the mesh pp1 x dp1 runs the pipeline on its 'pp' dimension of 1 ranks"):
        conveyor.PipelineRunner(_pipe(2), mesh=conveyor.mesh(pp=1, dp=1), **OPTIONS)


def test_parallelize_without_a_mesh_is_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="parallelize= needs mesh="):
        conveyor.PipelineRunner(_pipe(), parallelize=lambda module, mesh: module, **OPTIONS)


def test_parallelize_must_return_a_module(one_rank_group: None) -> None:
    with pytest.raises(TypeError, match="parallelize returned int for stage 0"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), parallelize=lambda module, mesh: 3, **OPTIONS)


def test_fsdp1_is_refused_naming_fsdp2_as_the_fix(one_rank_group: None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fsdp1(FullyShardedDataParallel):  # FSDP1 cannot be built on a CPU-only machine: its type suffices
        def __init__(self, module: nn.Module) -> None:
            nn.Module.__init__(self)
            self.inner = module

    with pytest.raises(ValueError, match=r"FullyShardedDataParallel \(FSDP1\).*fully_shard"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), parallelize=lambda module, mesh: Fsdp1(module),
                                **OPTIONS)


def test_a_wrapper_conveyor_cannot_drive_is_refused_by_name(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"nn.DataParallel"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), parallelize=lambda m, mesh: nn.DataParallel(m),
                                **OPTIONS)


def test_fully_shard_on_submodules_only_is_refused_with_the_fix(one_rank_group: None) -> None:
    mesh = conveyor.mesh(pp=1, dp=1)
    with pytest.raises(ValueError, match=r"not to the stage module itself.*fully_shard\(stage_module"):
        conveyor.PipelineRunner(_pipe(), mesh=mesh, parallelize=mesh_workers._fully_shard_children, **OPTIONS)


def test_asynchronous_schedules_on_a_mesh_with_wrapped_stages_are_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="'pipedream' updates each stage inside the pipeline"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), parallelize=lambda module, mesh: module,
                                schedule="pipedream", n_microbatches=2, loss_fn=mse)


def test_weights_tied_across_fsdp2_stages_are_refused(one_rank_group: None) -> None:
    mesh = conveyor.mesh(pp=1, dp=1)
    with pytest.raises(ValueError, match=r"tied across stages \(\['embed.weight'\]\).*DTensors"):
        conveyor.PipelineRunner(tied_pipe(TiedLM()), mesh=mesh, schedule="interleaved-1f1b", n_microbatches=2,
                                loss_fn=token_loss,
                                parallelize=lambda module, m: mesh_workers._fully_shard(module, m["dp"], True))


def test_replicas_and_mesh_together_are_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="replicas= and mesh= cannot be combined"):
        conveyor.PipelineRunner(_pipe(), mesh=conveyor.mesh(pp=1), replicas=[1], **OPTIONS)


def test_sharding_the_layers_of_a_traced_stage_that_never_calls_them_is_refused(one_rank_group: None) -> None:
    mesh = conveyor.mesh(pp=1, dp=1)
    pipe = conveyor.pipeline(mesh_workers.NamedNet(), n_stages=1, example_args=(mesh_workers.global_batch(0)[0][:4],))
    with pytest.raises(ValueError, match=r"traced graph that reads the parameters of 'inp' without calling it"):
        conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=lambda m, s: mesh_workers._fully_shard(m, s["dp"], True),
                                **OPTIONS)


def test_the_pipeline_dimension_may_have_another_name(one_rank_group: None) -> None:
    mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("pipe", "dp"))
    runner = conveyor.PipelineRunner(_pipe(), mesh=mesh, pp_dim="pipe", **OPTIONS)
    assert runner.mesh is mesh and runner.mesh_layout.pp_dim == "pipe" and runner.mesh_layout.data_size == 1
    x, y = mesh_workers.global_batch(0)
    assert runner.step(x, target=y) is not None
