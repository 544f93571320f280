"""Bad input gets an error naming the problem and the fix; failures name rank, stage,
micro-batch and action."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import conveyor

import workers
from models import batch, mlp, mse


def test_balance_that_does_not_cover_the_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"covers 7 layers but the model has 8; make the counts add up to 8"):
        conveyor.pipeline(mlp(), balance=[3, 3, 1])


def test_more_stages_than_layers_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cannot cut 8 layers into 9 stages.*use at most 8 stages"):
        conveyor.pipeline(mlp(), n_stages=9)


def test_unknown_schedule_name_lists_the_known_ones(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"unknown schedule 'zigzag'; choose one of \[.*'1f1b'.*'gpipe'"):
        conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="zigzag", n_microbatches=2)


def test_schedule_for_another_stage_count_is_refused(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match=r"2 stages for 1 ranks: cut the model into 1 stages"):
        conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="1f1b", n_microbatches=2)


def test_loss_fn_without_target_is_refused(one_rank_group: None) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="1f1b", n_microbatches=2,
                                     loss_fn=mse)
    with pytest.raises(ValueError, match=r"loss_fn needs a target: call step\(inputs..., target=labels\)"):
        runner.step(batch(0)[0])


def test_target_without_loss_fn_is_refused(one_rank_group: None) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="1f1b", n_microbatches=2)
    x, y = batch(0)
    with pytest.raises(ValueError, match=r"needs a loss: pass loss_fn=\.\.\. to PipelineRunner"):
        runner.step(x, target=y)


def test_empty_batch_is_refused(one_rank_group: None) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="1f1b", n_microbatches=2,
                                     loss_fn=mse)
    x, y = batch(0)
    with pytest.raises(ValueError, match=r"the batch is empty"):
        runner.step(x[:0], target=y[:0])


def test_batch_smaller_than_the_microbatch_count_is_refused(one_rank_group: None) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="gpipe", n_microbatches=4,
                                     loss_fn=mse)
    x, y = batch(0, rows=3)
    with pytest.raises(ValueError, match=r"a batch of 3 rows cannot be split into 4 micro-batches.*"
                                         r"n_microbatches <= 3"):
        runner.step(x, target=y)


def test_non_scalar_loss_is_refused(one_rank_group: None) -> None:
    def per_row(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((output - target) ** 2).mean(dim=1)

    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="gpipe", n_microbatches=2,
                                     loss_fn=per_row)
    x, y = batch(0)
    with pytest.raises(conveyor.PipelineError, match=r"stage 0, micro-batch 0, action 0F0: .*loss_fn returned "
                                                     r"\(8,\), not a scalar tensor"):
        runner.step(x, target=y)


def test_detached_stage_output_is_refused(one_rank_group: None) -> None:
    class Detach(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.detach()

    model = nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), Detach())
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=1), schedule="gpipe", n_microbatches=2,
                                     loss_fn=mse)
    x, y = batch(0)
    with pytest.raises(conveyor.PipelineError, match=r"does not require grad"):
        runner.step(x, target=y)


def test_non_tensor_boundary_value_is_refused(one_rank_group: None) -> None:
    from conveyor.runtime.bundle import flatten

    with pytest.raises(TypeError, match=r"contains a object at output\[1\]: only tensors"):
        flatten((torch.zeros(1), object()))


def test_shape_mismatch_between_stages_names_rank_stage_microbatch_and_input() -> None:
    with pytest.raises(conveyor.LaunchError, match=r"rank 1 failed") as caught:
        conveyor.launch(workers.mismatched_stages, 2, args=(4, 5, "float64"), timeout=60)
    assert "rank 1, stage 1, micro-batch 0, action 1F0" in str(caught.value)
    assert "its input from stage 0 was [float64(2, 4)]" in str(caught.value)


def test_dtype_mismatch_between_stages_names_the_input_dtype() -> None:
    with pytest.raises(conveyor.LaunchError, match=r"rank 1 failed") as caught:
        conveyor.launch(workers.mismatched_stages, 2, args=(6, 6, "float32"), timeout=60)
    assert "stage 1, micro-batch 0, action 1F0" in str(caught.value)
    assert "float64(2, 6)" in str(caught.value)


def test_exception_in_a_stage_forward_names_rank_stage_and_action() -> None:
    with pytest.raises(conveyor.LaunchError, match=r"rank 1 failed") as caught:
        conveyor.launch(workers.fail_in_forward, 4, timeout=60)
    assert "rank 1, stage 1, micro-batch 0, action 1F0: RuntimeError: boom in the user's layer" in str(caught.value)


def test_a_rank_raising_mid_step_ends_the_whole_job_quickly() -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError, match=r"^rank 2 failed") as caught:
        conveyor.launch(workers.hang_after_failure, 4, timeout=120)
    assert time.monotonic() - start < 30
    assert "ValueError: rank 2 gives up" in str(caught.value)
    assert caught.value.rank == 2
