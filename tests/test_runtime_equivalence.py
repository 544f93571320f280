"""Synchronous schedules give exactly the unsplit model's gradients and weights (float64)."""

from __future__ import annotations

import pytest
import torch

import conveyor

import workers
from models import batch, mlp, mse

SCHEDULES = ["gpipe", "1f1b"]
STAGES = [1, 2, 4]
MICROBATCHES = [1, 2, 4, 8]
ATOL = 1e-10


@pytest.fixture(scope="module")
def pipelined() -> dict:
    per_rank = conveyor.launch(workers.train_matrix, 4, args=(SCHEDULES, STAGES, MICROBATCHES), timeout=240)
    merged: dict = {}
    for rank_results in per_rank:
        for key, value in rank_results.items():
            entry = merged.setdefault(key, {"grads": {}, "weights": {}, "losses": [], "peak": {}})
            entry["grads"].update(value["grads"])
            entry["weights"].update(value["weights"])
            entry["peak"].update(value["peak"])
            if any(loss is not None for loss in value["losses"]):
                entry["losses"] = value["losses"]
    return merged


@pytest.fixture(scope="module")
def reference() -> dict:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads, losses = {}, []
    for step in range(workers.STEPS):
        optimizer.zero_grad()
        x, y = batch(step)
        loss = mse(model(x), y)
        loss.backward()
        losses.append(loss.detach())
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
    return {"grads": grads, "weights": model.state_dict(), "losses": losses}


CONFIGS = [(s, p, m) for s in SCHEDULES for p in STAGES for m in MICROBATCHES]


def _max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in theirs)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}stages-{c[2]}mb")
def test_gradients_equal_the_unsplit_model(pipelined: dict, reference: dict, config: tuple) -> None:
    assert _max_difference(pipelined[config]["grads"], reference["grads"]) < ATOL


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}stages-{c[2]}mb")
def test_weights_after_five_adam_steps_equal_the_unsplit_model(pipelined: dict, reference: dict,
                                                               config: tuple) -> None:
    assert _max_difference(pipelined[config]["weights"], reference["weights"]) < ATOL


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}stages-{c[2]}mb")
def test_returned_loss_is_the_full_batch_mean_loss(pipelined: dict, reference: dict, config: tuple) -> None:
    ours = torch.stack(pipelined[config]["losses"])
    assert torch.allclose(ours, torch.stack(reference["losses"]), atol=ATOL, rtol=0)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}stages-{c[2]}mb")
def test_peak_stashed_activations_match_the_schedule_bound(pipelined: dict, config: tuple) -> None:
    schedule, n_stages, n_microbatches = config
    bound = {stage: n_microbatches if schedule == "gpipe" else min(n_stages - stage, n_microbatches)
             for stage in range(n_stages)}
    assert pipelined[config]["peak"] == bound
