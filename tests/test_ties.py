"""A parameter held by two stages gets the summed gradient on both, so the copies never drift."""

from __future__ import annotations

import pytest
import torch

import conveyor

import workers
from models import TiedLM, token_loss

STEPS = 3


@pytest.fixture(scope="module")
def pipelined() -> list[dict]:
    return conveyor.launch(workers.tied_training, 3, args=(STEPS,), timeout=120)


@pytest.fixture(scope="module")
def reference() -> dict:
    model = TiedLM()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    grads = {}
    for step in range(STEPS):
        ids = torch.randint(0, 11, (4, 5), generator=generator)
        target = torch.randint(0, 11, (4, 5), generator=generator)
        optimizer.zero_grad()
        token_loss(model(ids), target).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    return {"grads": grads, "weights": dict(model.named_parameters()), "norm": norm}


def test_both_copies_of_a_tied_weight_get_the_full_gradient(pipelined: list[dict], reference: dict) -> None:
    expected = reference["grads"]["embed.weight"]
    for rank in (0, 2):
        assert torch.allclose(pipelined[rank]["grads"]["embed.weight"], expected, atol=1e-10, rtol=0)


def test_tied_copies_stay_bit_identical_after_optimizer_steps(pipelined: list[dict]) -> None:
    assert torch.equal(pipelined[0]["weights"]["embed.weight"], pipelined[2]["weights"]["embed.weight"])


def test_weights_after_steps_equal_the_unsplit_model(pipelined: list[dict], reference: dict) -> None:
    for result in pipelined:
        for name, weight in result["weights"].items():
            assert torch.allclose(weight, reference["weights"][name].detach(), atol=1e-10, rtol=0), name


def test_global_gradient_norm_counts_a_tied_weight_once(pipelined: list[dict], reference: dict) -> None:
    assert all(torch.allclose(r["norm"], reference["norm"], rtol=1e-9) for r in pipelined)


def test_clipping_scales_every_copy_of_a_tied_gradient_like_the_unsplit_model() -> None:
    model = TiedLM()
    generator = torch.Generator().manual_seed(0)
    ids, target = torch.randint(0, 11, (4, 5), generator=generator), torch.randint(0, 11, (4, 5), generator=generator)
    token_loss(model(ids), target).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.01)
    clipped = conveyor.launch(workers.tied_clipped, 3, args=(0.01,), timeout=60)
    for rank in (0, 2):
        assert torch.allclose(clipped[rank], model.embed.weight.grad, atol=1e-10, rtol=0)


def test_tied_copies_of_a_meta_model_start_equal_after_materialising() -> None:
    copies = conveyor.launch(workers.tied_meta_copies, 3, timeout=60)
    assert copies[0].numel() > 0 and torch.isfinite(copies[0]).all()
    assert torch.equal(copies[0], copies[2])
