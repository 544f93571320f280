"""Rank functions for the F&B pair tests: the same program run paired and unpaired."""

from __future__ import annotations

import torch
import torch.distributed as dist

import conveyor
from conveyor.schedule import make_schedule, pair_overlapping

from models import batch, mlp, mse, skip_model


def paired_and_unpaired(rank: int, world_size: int, configs: list[tuple]) -> dict:
    """configs: (model name, schedule, stages, micro-batches, recompute). For each, the loss and
    the gradients of two steps (dropout on: recompute replays it) run on the schedule's program and on
    the same program with its adjacent F/B actions paired; plus how many pairs there were."""
    results: dict = {}
    for config in configs:
        model_name, schedule, n_stages, n_microbatches, recompute = config
        program = make_schedule(schedule, world_size, n_stages, n_microbatches)
        paired = pair_overlapping(program)
        for label, chosen in (("unpaired", program), ("paired", paired)):
            model = mlp(layers=2 * n_stages, dropout=0.1) if model_name == "mlp" else skip_model(n_stages)
            pipe = conveyor.pipeline(model, n_stages=n_stages) if model_name == "mlp" else conveyor.pipeline(model)
            torch.manual_seed(1234)
            with conveyor.PipelineRunner(pipe, schedule=chosen, n_microbatches=n_microbatches, loss_fn=mse,
                                         recompute=recompute) as runner:
                grads, losses = [], []
                for step in range(2):
                    for p in runner.parameters():
                        p.grad = None
                    x, y = batch(step)
                    losses.append(runner.step(x, target=y))
                    grads.append({name: p.grad.clone() for name, p in runner.named_parameters()})
            results[(config, label)] = {"grads": grads, "losses": losses}
        results[(config, "pairs")] = sum(a.overlaps_next for a in paired.ranks[rank])
    dist.barrier()
    return results


def failing_pair(rank: int, world_size: int) -> None:
    """A paired program whose backward chunk fails on rank 0."""
    program = pair_overlapping(make_schedule("1f1b", 2, 2, 4))
    model = mlp(layers=4)

    def explode(module: object, grad_input: object, grad_output: object) -> None:
        raise RuntimeError("backward exploded")

    model[0].register_full_backward_hook(explode)
    with conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=2), schedule=program, n_microbatches=4,
                                 loss_fn=mse) as runner:
        x, y = batch(0)
        runner.step(x, target=y)


def moe_paired_and_unpaired(rank: int, world_size: int, schedule: str, n_microbatches: int) -> dict:
    """Two 2-stage pipelines (ranks 0-1 and 2-3) of toy MoE stages whose expert groups ({0, 2}
    for stage 0, {1, 3} for stage 1) run an all-to-all in every forward and backward: the
    gradients of two steps, unpaired and paired."""
    from conveyor.testing_moe import ExpertGroups, MoEStage

    pipelines = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    experts = [ExpertGroups.new([0, 2]), ExpertGroups.new([1, 3])]
    program = make_schedule(schedule, 2, 2, n_microbatches)
    paired = pair_overlapping(program)
    results: dict = {"pairs": sum(a.overlaps_next for a in paired.ranks[rank % 2])}
    for label, chosen in (("unpaired", program), ("paired", paired)):
        stages = [MoEStage(6, experts[s], seed=10 * s + rank // 2) for s in range(2)]
        with conveyor.PipelineRunner(conveyor.pipeline(stages), schedule=chosen, n_microbatches=n_microbatches,
                                     loss_fn=mse, group=pipelines[rank // 2]) as runner:
            grads = []
            for step in range(2):
                for p in runner.parameters():
                    p.grad = None
                x, y = batch(step + rank // 2, rows=4 * n_microbatches)
                runner.step(x, target=y)
                grads.append({name: p.grad.clone() for name, p in runner.named_parameters()})
        results[label] = grads
    dist.barrier()
    return results
