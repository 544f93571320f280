"""Replicated stages: 1F1B-RR equals its reference; synchronous schedules with replicas give the
unsplit model's gradients and weights (pipeline x data parallelism)."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.reference import AsyncReference
from conveyor.schedule import make_schedule

import async_workers
from async_workers import N_MICROBATCHES, make_optimizer, stream_batches
from models import batch, mlp, mse


@pytest.mark.parametrize("admitted", [None, 3], ids=["noam", "admitted-3"])
def test_1f1b_rr_weights_equal_the_reference_after_20_microbatches(admitted: int | None) -> None:
    replicas = [2, 1, 1]
    per_rank = conveyor.launch(async_workers.replicated_stream, 4, args=(replicas, 10, admitted), timeout=120)
    pipe = conveyor.pipeline(mlp(), n_stages=3)
    reference = AsyncReference([pipe.stage_module(i) for i in range(3)], mse, make_optimizer,
                               replicas=replicas, admitted=admitted)
    losses = reference.run(stream_batches(10), N_MICROBATCHES)
    expected = reference.state_dict()
    for rank_result in per_rank:
        for name, tensor in rank_result["weights"].items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-12)
    assert len(per_rank[-1]["losses"]) == len(losses) == 20
    torch.testing.assert_close(torch.stack(per_rank[-1]["losses"]), torch.stack(losses), rtol=0, atol=1e-12)


def test_replicas_of_a_stage_end_with_bit_identical_weights() -> None:
    per_rank = conveyor.launch(async_workers.replicated_stream, 4, args=([2, 1, 1], 4), timeout=120)
    assert per_rank[0]["stages"] == per_rank[1]["stages"] == [0]
    for name, tensor in per_rank[0]["weights"].items():
        assert torch.equal(tensor, per_rank[1]["weights"][name])


@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_two_pipelines_of_two_stages_train_exactly_like_the_unsplit_model(schedule: str) -> None:
    steps = 3
    per_rank = conveyor.launch(async_workers.replicated_steps, 4, args=(schedule, [2, 2], steps), timeout=120)
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        optimizer.zero_grad()
        inputs, target = batch(step)
        loss = mse(model(inputs), target)
        loss.backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
        for rank in (2, 3):  # both replicas of the last stage return the whole batch's loss
            torch.testing.assert_close(per_rank[rank]["losses"][step], loss.detach(), rtol=0, atol=1e-10)
    for rank_result in per_rank:
        for name, grad in rank_result["grads"].items():
            torch.testing.assert_close(grad, grads[name], rtol=0, atol=1e-10)
        for name, tensor in rank_result["weights"].items():
            torch.testing.assert_close(tensor, model.state_dict()[name], rtol=0, atol=1e-10)


def test_replicated_input_stage_admits_ceil_workers_over_replicas_microbatches() -> None:
    """PipeDream's NOAM: with replicas [2, 1, 1] each input replica has 2 micro-batches in flight."""
    program = make_schedule("pipedream", 4, 3, 8, replicas=[2, 1, 1])
    first = [str(action) for action in program.ranks[0][:3]]
    assert first == ["0F0v0", "0F2v0", "0B0"]
    assert program.replicas == ((0, 1), (2,), (3,))


def test_replica_counts_that_do_not_add_up_to_the_ranks_are_rejected_with_the_fix() -> None:
    with pytest.raises(ValueError, match="add up to 4"):
        make_schedule("1f1b", 4, 2, 4, replicas=[2, 1])


def test_schedules_without_replica_support_say_which_ones_have_it() -> None:
    with pytest.raises(ValueError, match="does not support replicated stages"):
        make_schedule("zb-h1", 4, 2, 4, replicas=[2, 2])


def test_a_checkpoint_of_replicated_stages_loads_into_the_unsplit_model(tmp_path) -> None:  # noqa: ANN001
    per_rank = conveyor.launch(async_workers.replicated_save, 4, args=(str(tmp_path / "ckpt"),), timeout=120)
    state = conveyor.load_full(tmp_path / "ckpt")
    model = mlp()
    model.load_state_dict(state)
    for rank_result in per_rank:
        for name, tensor in rank_result.items():
            assert torch.equal(state[name], tensor), name
