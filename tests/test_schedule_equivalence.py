"""Interleaved 1F1B, ZB-H1, ZB-V, ZB-H2, DualPipeV, V-Min and V-Half (and every schedule with a skip
connection across stages) train exactly like the unsplit model: gradients and weights after 5 Adam steps (float64)."""

from __future__ import annotations

import pytest
import torch

import conveyor

import workers
from models import batch, mlp, mse, skip_model

ATOL = 1e-10
CONFIGS = [
    (model, schedule, ranks, stages, microbatches, recompute)
    for recompute in (False, True)
    for model, schedule, ranks, stages, microbatches in [
        ("mlp", "interleaved-1f1b", 2, 4, 4),
        ("mlp", "interleaved-1f1b", 4, 8, 8),
        ("mlp", "zb-h1", 2, 2, 4),
        ("mlp", "zb-h1", 4, 4, 8),
        ("mlp", "zb-v", 2, 4, 4),
        ("mlp", "zb-v", 4, 8, 8),
        ("skip", "gpipe", 4, 4, 4),
        ("skip", "1f1b", 4, 4, 4),
        ("skip", "zb-h1", 4, 4, 4),
        ("skip", "interleaved-1f1b", 2, 4, 4),
        ("skip", "zb-v", 2, 4, 4),
        ("skip", "dualpipev", 2, 4, 5),
        ("mlp", "v-min", 4, 8, 9),
        ("skip", "v-half", 2, 4, 5),
        ("mlp", "zb-h2", 4, 4, 6),
    ]
]


@pytest.fixture(scope="module")
def pipelined() -> dict:
    merged: dict = {}
    for per_rank in conveyor.launch(workers.schedule_matrix, 4, args=(CONFIGS,), timeout=300):
        for config, result in per_rank.items():
            entry = merged.setdefault(config, {"grads": {}, "weights": {}})
            entry["grads"].update(result["grads"])
            entry["weights"].update(result["weights"])
    return merged


def _reference(model_name: str, n_stages: int) -> dict:
    model = mlp(layers=2 * n_stages) if model_name == "mlp" else torch.nn.Sequential(*skip_model(n_stages))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = {}
    for step in range(workers.STEPS):
        optimizer.zero_grad()
        x, y = batch(step)
        mse(model(x), y).backward()
        if step == 0:
            grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        optimizer.step()
    return {"grads": grads, "weights": model.state_dict()}


def _name(config: tuple) -> str:
    model, schedule, ranks, stages, microbatches, recompute = config
    return f"{model}-{schedule}-{ranks}ranks-{stages}stages-{microbatches}mb" + ("-recompute" if recompute else "")


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_gradients_equal_the_unsplit_model(pipelined: dict, config: tuple) -> None:
    reference = _reference(config[0], config[3])
    ours = pipelined[config]["grads"]
    assert ours.keys() == reference["grads"].keys()
    for name, grad in reference["grads"].items():
        assert torch.allclose(ours[name], grad, atol=ATOL, rtol=0), name


@pytest.mark.parametrize("config", CONFIGS, ids=_name)
def test_weights_after_five_adam_steps_equal_the_unsplit_model(pipelined: dict, config: tuple) -> None:
    reference = _reference(config[0], config[3])
    ours = pipelined[config]["weights"]
    assert ours.keys() == reference["weights"].keys()
    for name, weight in reference["weights"].items():
        assert torch.allclose(ours[name], weight, atol=ATOL, rtol=0), name


def test_a_hand_written_program_loaded_from_text_trains_like_the_unsplit_model() -> None:
    grads = {name: grad for result in conveyor.launch(workers.custom_schedule, 2, timeout=60)
             for name, grad in result.items()}
    model = mlp()
    x, y = batch(0)
    mse(model(x), y).backward()
    for name, parameter in model.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=ATOL, rtol=0), name
