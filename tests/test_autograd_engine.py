"""Stages call autograd's engine through a private entry only while its signature is the one we
call; on the installed torch it gives exactly the public functions' gradients."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn as nn

import conveyor.runtime.stage as stage_module
from conveyor.runtime.stage import StageExecutor, engine_entry


def _stage() -> StageExecutor:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 5, dtype=torch.float64), nn.Tanh(), nn.Linear(5, 3, dtype=torch.float64))
    return StageExecutor(1, module, is_first=False, is_last=False, loss_fn=None, recompute=False,
                         device=torch.device("cpu"))


def _run(split: bool) -> tuple[list, list]:
    stage = _stage()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    grad = torch.randn(6, 3, dtype=torch.float64, generator=generator)
    stage.forward(0, (x,), {}, fresh=False)
    if split:
        input_grads = stage.backward_input(0, [grad])
        stage.backward_weight(0)
    else:
        input_grads = stage.backward(0, [grad])
    return input_grads, [p.grad for p in stage.module.parameters()]


@pytest.mark.parametrize("split", [False, True], ids=["backward", "input-then-weight-grad"])
def test_the_private_engine_path_equals_the_public_one(split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert stage_module._engine_run_backward is not None  # the installed torch has the expected entry
    private_inputs, private_params = _run(split)
    monkeypatch.setattr(stage_module, "_engine_run_backward", None)
    public_inputs, public_params = _run(split)
    for ours, theirs in zip(private_inputs + private_params, public_inputs + public_params, strict=True):
        assert ours is not None and torch.equal(ours, theirs)


def test_an_entry_with_another_signature_selects_the_public_path() -> None:
    def positional(tensors: Any, grad_tensors: Any, keep_graph: bool, create_graph: bool, inputs: Any) -> None:
        raise AssertionError("never called")

    def renamed(outputs: Any, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("never called")

    assert engine_entry(positional) is None
    assert engine_entry(renamed) is None
    assert engine_entry(None) is None
    assert engine_entry(torch.autograd.graph._engine_run_backward) is torch.autograd.graph._engine_run_backward
