"""A model built on the meta device: each rank materialises only its own stage."""

from __future__ import annotations

import pytest
import torch

import conveyor

import workers
from models import batch, mlp, mse


@pytest.fixture(scope="module")
def per_rank() -> list[dict]:
    return conveyor.launch(workers.meta_model, 2, args=(mlp().state_dict(),), timeout=120)


def test_each_rank_allocates_only_its_own_stage(per_rank: list[dict]) -> None:
    assert all(result["others_on_meta"] for result in per_rank)
    assert not any(result["mine_on_meta"] for result in per_rank)


def test_materialised_stages_are_initialised_by_reset_parameters(per_rank: list[dict]) -> None:
    assert all(result["finite"] for result in per_rank)


def test_loaded_meta_model_trains_like_the_unsplit_model(per_rank: list[dict]) -> None:
    model = mlp()
    x, y = batch(0)
    mse(model(x), y).backward()
    grads = {name: grad for result in per_rank for name, grad in result["grads"].items()}
    assert grads.keys() == dict(model.named_parameters()).keys()
    for name, parameter in model.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=1e-10, rtol=0), name


def test_pipeline_of_a_meta_model_allocates_nothing() -> None:
    with torch.device("meta"):
        model = mlp()
    pipe = conveyor.pipeline(model, n_stages=4)
    assert all(p.is_meta for stage in range(4) for p in pipe.stage_module(stage).parameters())
