"""Forward-only inference, rich boundaries, variable shapes, uneven micro-batches, recompute."""

from __future__ import annotations

import pytest
import torch

import conveyor

import workers
from models import batch, masked_model, mlp, mse


@pytest.fixture(scope="module")
def uneven_and_recompute() -> list[dict]:
    return conveyor.launch(workers.uneven_and_recompute, 2, timeout=120)


def _merge(per_rank: list[dict], key: object) -> dict:
    merged: dict = {}
    for result in per_rank:
        merged.update(result[key])
    return merged


def test_forward_only_output_equals_the_unsplit_model() -> None:
    outputs = conveyor.launch(workers.forward_only, 4, timeout=120)
    assert outputs[:3] == [None, None, None]
    model = mlp().eval()
    with torch.no_grad():
        expected = model(batch(0, rows=10)[0])
    assert torch.allclose(outputs[3], expected, atol=1e-12, rtol=0)
    assert not outputs[3].requires_grad


@pytest.mark.parametrize("schedule", ["interleaved-1f1b", "zb-v"])
def test_forward_only_with_several_stages_per_rank_equals_the_unsplit_model(schedule: str) -> None:
    outputs = conveyor.launch(workers.forward_only, 2, args=(schedule, 4), timeout=120)
    last_rank = 1 if schedule == "interleaved-1f1b" else 0  # zb-v's last stage comes back to rank 0
    model = mlp().eval()
    with torch.no_grad():
        expected = model(batch(0, rows=10)[0])
    assert outputs[1 - last_rank] is None
    assert torch.allclose(outputs[last_rank], expected, atol=1e-12, rtol=0)


def test_tuple_boundary_with_integer_ids_and_bool_mask_and_changing_length() -> None:
    per_rank = conveyor.launch(workers.tuple_boundary, 3, timeout=120)
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(*masked_model())
    for length in (5, 3, 7):
        model.zero_grad()
        ids = torch.randint(0, 10, (4, length), generator=generator)
        target = torch.randn(4, 6, dtype=torch.float64, generator=generator)
        loss = mse(model(ids), target)
        loss.backward()
        assert torch.allclose(per_rank[2][length]["loss"], loss, atol=1e-12, rtol=0)
        grads = {}
        for result in per_rank:
            grads.update(result[length]["grads"])
        for name, parameter in model.named_parameters():
            assert torch.allclose(grads[name], parameter.grad, atol=1e-10, rtol=0), (length, name)


def test_uneven_microbatches_give_the_full_batch_gradient(uneven_and_recompute: list[dict]) -> None:
    model = mlp()
    x, y = batch(3, rows=10)
    loss = mse(model(x), y)
    loss.backward()
    assert torch.allclose(uneven_and_recompute[1]["uneven_loss"], loss, atol=1e-12, rtol=0)
    grads = _merge(uneven_and_recompute, "uneven_grads")
    for name, parameter in model.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=1e-10, rtol=0), name


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_recompute_replays_dropout_masks_exactly(uneven_and_recompute: list[dict], schedule: str) -> None:
    plain = _merge(uneven_and_recompute, ("dropout", schedule, False))
    recomputed = _merge(uneven_and_recompute, ("dropout", schedule, True))
    assert plain.keys() == recomputed.keys()
    for name in plain:
        assert torch.equal(plain[name], recomputed[name]), name


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_dropout_is_active_in_the_recompute_comparison(uneven_and_recompute: list[dict], schedule: str) -> None:
    """Guards the test above: with p=0.5 the gradients differ from the dropout-free model's."""
    torch.manual_seed(0)
    model = mlp()
    x, y = batch(4)
    mse(model(x), y).backward()
    grads = _merge(uneven_and_recompute, ("dropout", schedule, True))
    assert any(not torch.allclose(grads[name], p.grad) for name, p in model.named_parameters())


def test_stash_holds_only_inputs_under_recompute_and_follows_the_bound(uneven_and_recompute: list[dict]) -> None:
    peaks = _merge(uneven_and_recompute, ("peak", "1f1b", True))
    assert peaks == {0: 2, 1: 1}
    peaks = _merge(uneven_and_recompute, ("peak", "gpipe", True))
    assert peaks == {0: 4, 1: 4}


def test_recompute_stash_keeps_no_autograd_graph(one_rank_group: None) -> None:
    pipe = conveyor.pipeline(mlp(dropout=0.5), n_stages=1)
    runner = conveyor.PipelineRunner(pipe, schedule="gpipe", n_microbatches=2, loss_fn=mse, recompute=True)
    x, y = batch(0)
    stage = runner.stages[0]
    for microbatch in range(2):
        rows = slice(8 * microbatch, 8 * microbatch + 8)
        stage.forward(microbatch, (x[rows],), {}, target=y[rows], weight=0.5)
    assert stage.stashed == 2
    assert all(not entry.outputs for entry in stage._stash.values())
    assert all(leaf.grad_fn is None for entry in stage._stash.values() for leaf in entry.args)


def test_state_dict_uses_the_unsplit_model_names(one_rank_group: None) -> None:
    model = mlp()
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=1), schedule="1f1b", n_microbatches=2)
    assert list(runner.state_dict()) == list(model.state_dict())
    assert [name for name, _ in runner.named_parameters()] == [name for name, _ in model.named_parameters()]


def test_global_gradient_clipping_matches_torch(one_rank_group: None) -> None:
    model = mlp()
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=1), schedule="1f1b", n_microbatches=4,
                                     loss_fn=mse)
    x, y = batch(0)
    runner.step(x * 100, target=y)
    mse(model(x * 100), y).backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    norm = runner.clip_grad_norm_(0.1)
    assert torch.allclose(norm, expected.double(), rtol=1e-9)
    for (name, ours), theirs in zip(runner.named_parameters(), model.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-12), name


def test_token_weighting_matches_a_token_averaged_full_batch_loss(one_rank_group: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(7, 7, dtype=torch.float64))
    targets = torch.randint(0, 7, (6, 5))
    targets[0, :4] = -100  # micro-batch 0 counts far fewer tokens than the others
    targets[1, :3] = -100
    ids = torch.randint(0, 7, (6, 5))

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)

    expected = loss_fn(model(ids), targets)
    expected.backward()
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=1), schedule="gpipe", n_microbatches=3,
                                     loss_fn=loss_fn, loss_weighting="tokens")
    for parameter in runner.parameters():
        parameter.grad = None
    loss = runner.step(ids, target=targets)
    assert torch.allclose(loss, expected, atol=1e-12)
    assert torch.allclose(next(runner.parameters()).grad, next(model.parameters()).grad, atol=1e-12)


def test_recompute_frees_each_forward_graph_without_the_garbage_collector(one_rank_group: None) -> None:
    import gc
    import weakref

    gc.disable()
    try:
        pipe = conveyor.pipeline([torch.nn.Linear(6, 6, dtype=torch.float64), torch.nn.Tanh()])
        runner = conveyor.PipelineRunner(pipe, schedule="interleaved-1f1b", n_microbatches=1, loss_fn=mse,
                                         recompute=True)
        x, _ = batch(0)
        output = runner.stages[0].forward(0, (x,), {})
        assert output.grad_fn is not None
        watcher = weakref.ref(output)
        del output
        freed = watcher() is None
    finally:
        gc.enable()
    assert freed
