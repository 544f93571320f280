"""torch.compile'd stage modules under zero-bubble and V schedules, with and without recompute:
the gradients equal eager's (float64, atol 1e-10). A compiled stage's backward is one node that
computes input and weight gradients together, so I runs it whole and W does nothing."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.runtime.compiled import is_compiled
from conveyor.runtime.stage import StageExecutor

from models import batch, mlp, mse

ATOL = 1e-10


def _compiled_grads(schedule: str, n_stages: int, recompute: bool) -> dict[str, torch.Tensor]:
    pipe = conveyor.pipeline(mlp(layers=2 * n_stages), n_stages=n_stages)
    for index in range(n_stages):
        pipe.stage_module(index).compile()  # in place: parameter names stay those of the model
    runner = conveyor.LocalPipeline(pipe, schedule=schedule, n_microbatches=4, loss_fn=mse, n_ranks=2,
                                    devices="cpu", recompute=recompute)
    assert all(stage.whole_backward for stage in runner.stages)
    x, y = batch(0)
    runner.step(x, target=y)
    return {name: p.grad for name, p in runner.named_parameters()}


def _eager_grads(n_stages: int) -> dict[str, torch.Tensor]:
    model = mlp(layers=2 * n_stages)
    x, y = batch(0)
    mse(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def _assert_close(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == reference.keys()
    for name, grad in reference.items():
        assert torch.allclose(ours[name], grad, atol=ATOL, rtol=0), name


def test_compiled_stages_under_zb_h1_give_eager_gradients() -> None:  # first: pays the compile (~20 s)
    _assert_close(_compiled_grads("zb-h1", 2, recompute=False), _eager_grads(2))


@pytest.mark.parametrize(("schedule", "n_stages", "recompute"),
                         [("zb-h1", 2, True), ("zb-v", 4, False), ("zb-v", 4, True), ("interleaved-1f1b", 4, True)])
def test_compiled_stages_under_zero_bubble_and_v_schedules_give_eager_gradients(schedule: str, n_stages: int,
                                                                                recompute: bool) -> None:
    _assert_close(_compiled_grads(schedule, n_stages, recompute), _eager_grads(n_stages))


def test_a_compiled_stage_accumulates_its_weight_gradients_at_input_grad_time() -> None:
    module = torch.nn.Linear(3, 3, dtype=torch.float64)
    module.compile()
    assert is_compiled(module) and not is_compiled(torch.nn.Linear(3, 3))
    stage = StageExecutor(1, module, is_first=False, is_last=False, loss_fn=None, recompute=False,
                          device=torch.device("cpu"))
    stage.forward(0, (torch.randn(2, 3, dtype=torch.float64),), {})
    stage.backward_input(0, [torch.ones(2, 3, dtype=torch.float64)])
    assert module.weight.grad is not None  # I ran the whole backward
    grad = module.weight.grad.clone()
    stage.backward_weight(0)
    assert torch.equal(module.weight.grad, grad)  # W added nothing
