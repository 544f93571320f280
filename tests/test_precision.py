"""Mixed precision on CPU: bf16 autocast per stage with fp32 master weights, fp16 loss scaling
with one overflow decision for the whole pipeline.

bf16 tolerance: the pipeline's gradients are compared with the unsplit model run under the same
``torch.autocast("cpu", dtype=torch.bfloat16)``, at atol 1e-3 + rtol 2e-2: micro-batching changes
the order of bf16 reductions (we measured at most 1.5e-4 absolute, 0.4% of the largest gradient).
"""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.runtime.precision import LossScaler

import workers
from models import batch, batch32, mlp, mlp32, mse

BF16_ATOL, BF16_RTOL = 1e-3, 2e-2


def _local(model: torch.nn.Module, precision: str, schedule: str = "1f1b") -> conveyor.LocalPipeline:
    n_ranks = 2 if schedule in ("zb-v", "interleaved-1f1b") else 4
    return conveyor.LocalPipeline(conveyor.pipeline(model, n_stages=4), schedule=schedule, n_microbatches=4,
                                  loss_fn=mse, n_ranks=n_ranks, precision=precision)


def _autocast_reference(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    model = mlp32()
    x, y = batch32()
    with torch.autocast("cpu", dtype=dtype):
        loss = mse(model(x), y)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"])
def test_bf16_gradients_are_close_to_the_unsplit_model_under_the_same_autocast(schedule: str) -> None:
    pipeline = _local(mlp32(), "bf16", schedule)
    x, y = batch32()
    pipeline.step(x, target=y)
    reference = _autocast_reference(torch.bfloat16)
    for name, parameter in pipeline.named_parameters():
        assert torch.allclose(parameter.grad, reference[name], atol=BF16_ATOL, rtol=BF16_RTOL), name


def test_bf16_runs_the_stages_in_bf16_but_keeps_fp32_master_weights_and_gradients() -> None:
    pipeline = _local(mlp32(), "bf16")
    x, y = batch32()
    pipeline.step(x, target=y)
    assert pipeline.eval().forward(x).dtype == torch.bfloat16
    assert {p.dtype for p in pipeline.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in pipeline.parameters()} == {torch.float32}


def test_fp16_scales_every_stage_gradient_by_the_loss_scale() -> None:
    # float64 parameters are left alone by autocast, so the only effect is the scaling: exact.
    pipeline = _local(mlp(), "fp16")
    x, y = batch(0)
    pipeline.step(x, target=y)
    model = mlp()
    mse(model(x), y).backward()
    reference = {n: p.grad for n, p in model.named_parameters()}
    scale = pipeline.loss_scale
    assert scale == 2.0 ** 16
    for name, parameter in pipeline.named_parameters():
        assert torch.allclose(parameter.grad, reference[name] * scale, rtol=1e-12, atol=0), name
    assert not pipeline.unscale_and_check()
    for name, parameter in pipeline.named_parameters():
        assert torch.allclose(parameter.grad, reference[name], rtol=1e-12, atol=0), name


def test_fp16_overflow_on_one_stage_skips_the_step_on_every_stage_and_halves_the_scale() -> None:
    pipeline = _local(mlp32(), "fp16")
    optimizer = torch.optim.SGD(pipeline.parameters(), lr=0.1)
    x, y = batch32()
    pipeline.step(x, target=y)
    pipeline.stages[2].module.get_parameter("4.weight").grad.view(-1)[0] = float("inf")
    before = {n: p.detach().clone() for n, p in pipeline.named_parameters()}
    assert pipeline.optimizer_step(optimizer) is False
    assert all(torch.equal(p, before[n]) for n, p in pipeline.named_parameters())
    assert pipeline.loss_scale == 2.0 ** 15


def test_fp16_clean_step_updates_every_stage_and_keeps_the_scale() -> None:
    pipeline = _local(mlp32(), "fp16")
    optimizer = torch.optim.SGD(pipeline.parameters(), lr=0.1)
    x, y = batch32()
    pipeline.step(x, target=y)
    before = {n: p.detach().clone() for n, p in pipeline.named_parameters()}
    assert pipeline.optimizer_step(optimizer) is True
    assert all(not torch.equal(p, before[n]) for n, p in pipeline.named_parameters())
    assert pipeline.loss_scale == 2.0 ** 16


def test_loss_scale_grows_after_the_growth_interval_of_clean_steps() -> None:
    scaler = LossScaler(init_scale=8.0, growth_interval=3)
    for _ in range(2):
        scaler.update(False)
    assert scaler.scale == 8.0
    scaler.update(False)
    assert scaler.scale == 16.0
    scaler.update(True)
    assert scaler.scale == 8.0 and scaler.clean_steps == 0


def test_an_unknown_precision_is_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match="'bf16'"):
        _local(mlp32(), "fp8")


@pytest.fixture(scope="module")
def overflow_on_rank_one() -> list[dict]:
    return conveyor.launch(workers.precision_step, 2, args=("fp16", 1), timeout=120)


def test_fp16_overflow_on_one_rank_makes_every_rank_skip(overflow_on_rank_one: list[dict]) -> None:
    assert [r["stepped"] for r in overflow_on_rank_one] == [False, False]
    for result in overflow_on_rank_one:
        assert all(torch.equal(result["after"][n], result["before"][n]) for n in result["before"])


def test_fp16_overflow_on_one_rank_halves_the_scale_on_every_rank(overflow_on_rank_one: list[dict]) -> None:
    assert [(r["scale_before"], r["scale_after"]) for r in overflow_on_rank_one] == [(2.0 ** 16, 2.0 ** 15)] * 2


def test_fp16_clean_step_steps_on_every_rank() -> None:
    results = conveyor.launch(workers.precision_step, 2, args=("fp16", None), timeout=120)
    assert [(r["stepped"], r["scale_after"]) for r in results] == [(True, 2.0 ** 16)] * 2
    reference = _autocast_reference(torch.float16)
    for result in results:
        for name, grad in result["grads"].items():
            assert torch.allclose(grad, reference[name], atol=1e-4, rtol=1e-3), name


def test_bf16_runner_gradients_are_close_to_the_unsplit_model_under_autocast() -> None:
    results = conveyor.launch(workers.precision_step, 2, args=("bf16", None), timeout=120)
    reference = _autocast_reference(torch.bfloat16)
    for result in results:
        assert set(result["dtypes"].values()) == {torch.float32}
        for name, grad in result["grads"].items():
            assert torch.allclose(grad, reference[name], atol=BF16_ATOL, rtol=BF16_RTOL), name


def test_each_step_is_unscaled_again_even_when_the_previous_one_was_not_stepped() -> None:
    pipeline = _local(mlp(), "fp16")
    x, y = batch(0)
    for _ in range(2):
        for parameter in pipeline.parameters():
            parameter.grad = None
        pipeline.step(x, target=y)
        pipeline.unscale_and_check()  # e.g. before clipping; the optimizer step is left to the caller
    model = mlp()
    mse(model(x), y).backward()
    for (name, parameter), reference in zip(pipeline.named_parameters(), model.parameters()):
        assert torch.allclose(parameter.grad, reference.grad, rtol=1e-12, atol=0), name


@pytest.mark.parametrize("schedule", ["1f1b", "zb-v"])
def test_bf16_recompute_replays_the_autocast_forward_exactly(schedule: str) -> None:
    x, y = batch32()
    grads = []
    for recompute in (False, True):
        n_ranks = 2 if schedule == "zb-v" else 4
        pipeline = conveyor.LocalPipeline(conveyor.pipeline(mlp32(), n_stages=4), schedule=schedule,
                                          n_microbatches=4, loss_fn=mse, n_ranks=n_ranks, precision="bf16",
                                          recompute=recompute)
        pipeline.step(x, target=y)
        grads.append({n: p.grad for n, p in pipeline.named_parameters()})
    assert all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0])


def test_fp16_with_an_asynchronous_schedule_is_rejected(one_rank_group: None) -> None:
    with pytest.raises(ValueError, match="use precision='bf16'"):
        conveyor.PipelineRunner(conveyor.pipeline(mlp32(), n_stages=1), schedule="pipedream", n_microbatches=2,
                                loss_fn=mse, precision="fp16", device="cpu")


def test_bf16_runs_an_asynchronous_schedule_with_fp32_weights() -> None:
    per_rank = conveyor.launch(workers.bf16_stream, 2, timeout=120)
    losses = per_rank[1]["losses"]
    assert len(losses) == 6 and all(torch.isfinite(loss).all() for loss in losses)
    assert all(r["moved"] and r["dtypes"] == {torch.float32} for r in per_rank)
