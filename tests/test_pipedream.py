"""Asynchronous schedules (PipeDream, vertical sync, 2BW) equal a single-process reference of the
same semantics, exactly, in float64."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.reference import AsyncReference

import async_workers
from async_workers import N_MICROBATCHES, make_optimizer, stream_batches
from models import mlp, mse

N_BATCHES = 10  # 20 micro-batches

CONFIGS = [
    ("pipedream", 2, {}),
    ("pipedream", 4, {}),
    ("pipedream", 2, {"vertical_sync": True}),
    ("pipedream", 4, {"vertical_sync": True}),
    ("pipedream-2bw", 2, {}),
    ("pipedream-2bw", 4, {}),
    ("pipedream-2bw", 4, {"window": 6}),
]


def reference_run(schedule: str, n_stages: int, options: dict, n_batches: int = N_BATCHES) -> AsyncReference:
    pipe = conveyor.pipeline(mlp(), n_stages=n_stages)
    reference = AsyncReference([pipe.stage_module(i) for i in range(n_stages)], mse, make_optimizer,
                               schedule=schedule, **options)
    reference.losses = reference.run(stream_batches(n_batches), N_MICROBATCHES)
    return reference


@pytest.fixture(scope="module", params=CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}stages-{c[2]}")
def config_and_run(request: pytest.FixtureRequest) -> tuple:
    schedule, n_stages, options = request.param
    per_rank = conveyor.launch(async_workers.stream_train, n_stages, args=(schedule, options, N_BATCHES), timeout=120)
    return request.param, per_rank


def test_weights_after_20_microbatches_equal_the_reference_exactly(config_and_run: tuple) -> None:
    (schedule, n_stages, options), per_rank = config_and_run
    expected = reference_run(schedule, n_stages, options).state_dict()
    for rank_result in per_rank:
        for name, tensor in rank_result["weights"].items():
            assert torch.equal(tensor, expected[name]), f"{name}: max diff {(tensor - expected[name]).abs().max()}"


def test_microbatch_losses_equal_the_reference_exactly(config_and_run: tuple) -> None:
    (schedule, n_stages, options), per_rank = config_and_run
    expected = reference_run(schedule, n_stages, options).losses
    losses = per_rank[-1]["losses"]
    assert len(losses) == N_BATCHES * N_MICROBATCHES
    assert all(torch.equal(a, b) for a, b in zip(losses, expected))


def test_stage_s_holds_at_most_the_documented_number_of_weight_versions(config_and_run: tuple) -> None:
    (schedule, n_stages, options), per_rank = config_and_run
    for stage, rank_result in enumerate(per_rank):
        if schedule == "pipedream-2bw":
            bound = 2
        elif options.get("vertical_sync"):
            bound = n_stages
        else:
            bound = n_stages - stage
        assert rank_result["versions"][stage] <= bound


def test_the_pipeline_updates_weights_between_forward_and_backward() -> None:
    """The reference is not trivially equal to synchronous training: versions really differ."""
    reference = reference_run("pipedream", 4, {})
    assert reference.used_versions[0][:6] == [0, 0, 0, 0, 1, 2]
    assert reference.used_versions[3][:6] == [0, 1, 2, 3, 4, 5]


def test_with_learning_rate_zero_async_gradients_equal_1f1b_gradients() -> None:
    """lr=0 keeps every version equal, so the summed applied gradient is 1F1B's (flush) gradient."""
    n_batches = 3
    per_rank = conveyor.launch(async_workers.first_gradients, 2, args=("pipedream", n_batches), timeout=120)
    applied = {name: grad for rank_result in per_rank for name, grad in rank_result.items()}
    model = mlp()
    for inputs, target in stream_batches(n_batches):
        for part, part_target in zip(inputs.tensor_split(N_MICROBATCHES), target.tensor_split(N_MICROBATCHES)):
            mse(model(part), part_target).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(applied[name], parameter.grad, rtol=0, atol=1e-12)


def test_saving_after_a_drained_stream_and_resuming_equals_the_straight_run(tmp_path) -> None:  # noqa: ANN001
    straight = conveyor.launch(async_workers.drain_save_resume, 2, args=(str(tmp_path / "unused"), False), timeout=120)
    resumed = conveyor.launch(async_workers.drain_save_resume, 2, args=(str(tmp_path / "ckpt"), True), timeout=120)
    for straight_rank, resumed_rank in zip(straight, resumed):
        for name, tensor in straight_rank["weights"].items():
            assert torch.equal(tensor, resumed_rank["weights"][name]), name
    assert all(torch.equal(a, b) for a, b in zip(straight[-1]["losses"], resumed[-1]["losses"]))


@pytest.mark.parametrize(("case", "fix"), [("step-on-async", "runner.stream"), ("stream-on-sync", "step()")])
def test_calling_the_wrong_entry_point_names_the_right_one(case: str, fix: str) -> None:
    messages = conveyor.launch(async_workers.misuse, 2, args=(case,), timeout=60)
    assert all(fix in message for message in messages), messages
