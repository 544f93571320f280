"""PipelineRunner(schedule="auto"): profiling on the first step leaves no trace, so the step's
results are the unsplit model's (float64) and the chosen program's alone."""

from __future__ import annotations

import pytest
import torch

import conveyor

import auto_workers
from models import batch, mlp, mse

ATOL = 1e-10


@pytest.fixture(scope="module")
def plain() -> list[dict]:
    return conveyor.launch(auto_workers.auto_and_explicit, 2, args=(0.0, False), timeout=120)


def test_auto_gives_the_unsplit_models_gradients_from_the_first_step(plain: list[dict]) -> None:
    model = mlp(layers=4)
    for step in range(auto_workers.STEPS):
        model.zero_grad()
        x, y = batch(step)
        mse(model(x), y).backward()
        ours = {name: grad for rank in plain for name, grad in rank["auto"]["grads"][step].items()}
        assert ours.keys() == dict(model.named_parameters()).keys()
        for name, parameter in model.named_parameters():
            assert torch.allclose(ours[name], parameter.grad, atol=ATOL, rtol=0), (step, name)


def test_rank_0_decides_and_every_rank_runs_the_same_valid_program(plain: list[dict]) -> None:
    programs = {rank["auto"]["program"] for rank in plain}
    assert len(programs) == 1
    program = conveyor.schedule.validate(conveyor.Schedule.from_text(programs.pop()))
    assert (program.n_ranks, program.n_microbatches) == (2, 6)
    profile = plain[0]["auto"]["profile"]
    assert set(profile["costs"]) == {"F", "I", "W"} and all(len(v) == 2 for v in profile["costs"].values())
    assert profile["comm"] >= 0 and plain[1]["auto"]["profile"] is None


@pytest.mark.parametrize("recompute", [False, True])
def test_profiling_leaves_no_random_draws_or_gradients_behind(recompute: bool) -> None:
    # dropout draws from the global stream: had profiling drawn, the auto run would differ bitwise
    runs = conveyor.launch(auto_workers.auto_and_explicit, 2, args=(0.3, recompute), timeout=120)
    for rank in runs:
        for mine, theirs in zip(rank["auto"]["grads"], rank["explicit"]["grads"]):
            assert all(torch.equal(mine[name], theirs[name]) for name in theirs)
        for mine, theirs in zip(rank["auto"]["losses"], rank["explicit"]["losses"]):
            assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_auto_refuses_options_it_does_not_take(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="takes only the option memory_limit"):
        conveyor.PipelineRunner(conveyor.pipeline(mlp(layers=4), n_stages=1), schedule="auto", n_microbatches=2,
                                loss_fn=mse, admitted=3)
