"""LocalPipeline (every stage in one process) gives exactly the unsplit model's results (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import conveyor

from models import TiedLM, _Named, _Tanh, _TiedHead, batch, mlp, mse, tied_pipe, token_loss

ATOL = 1e-10
# (schedule, ranks, stages): interleaved and the V schedules put two stages on each rank
CONFIGS = [("gpipe", 4, 4), ("1f1b", 4, 4), ("interleaved-1f1b", 2, 4), ("zb-h1", 4, 4), ("zb-v", 2, 4),
           ("zb-h2", 4, 4), ("dualpipev", 2, 4), ("v-min", 2, 4), ("v-half", 2, 4)]


def _local(schedule: str, n_ranks: int, n_stages: int, recompute: bool = False,
           dropout: float = 0.0) -> conveyor.LocalPipeline:
    return conveyor.LocalPipeline(conveyor.pipeline(mlp(dropout=dropout), n_stages=n_stages), schedule=schedule,
                                  n_microbatches=4, loss_fn=mse, n_ranks=n_ranks, recompute=recompute)


def _max_difference(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[name] - theirs[name]).abs().max().item() for name in theirs)


def _reference_after_adam(steps: int) -> tuple[dict, dict]:
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = {}
    for step in range(steps):
        optimizer.zero_grad()
        x, y = batch(step)
        mse(model(x), y).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
    return grads, model.state_dict()


@pytest.mark.parametrize("recompute", [False, True], ids=["stash", "recompute"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_gradients_and_weights_equal_the_unsplit_model(config: tuple, recompute: bool) -> None:
    pipeline = _local(*config, recompute=recompute)
    optimizer = torch.optim.Adam(pipeline.parameters(), lr=0.01)
    grads = {}
    for step in range(3):
        optimizer.zero_grad()
        x, y = batch(step)
        pipeline.step(x, target=y)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in pipeline.named_parameters()}
        optimizer.step()
    reference_grads, reference_weights = _reference_after_adam(3)
    assert _max_difference(grads, reference_grads) < ATOL
    assert _max_difference(pipeline.state_dict(), reference_weights) < ATOL


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_step_returns_the_full_batch_mean_loss(config: tuple) -> None:
    x, y = batch(0, rows=10)  # 10 rows into 4 micro-batches: 3, 3, 2, 2
    loss = _local(*config).step(x, target=y)
    assert abs(loss.item() - mse(mlp()(x), y).item()) < ATOL


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_forward_returns_the_unsplit_output(config: tuple) -> None:
    x, _ = batch(1, rows=10)
    pipeline = _local(*config).eval()
    assert torch.allclose(pipeline.forward(x), mlp()(x), atol=ATOL, rtol=0)


def test_recompute_replays_dropout_masks() -> None:
    stashed, replayed = _local("1f1b", 4, 4, dropout=0.5), _local("1f1b", 4, 4, recompute=True, dropout=0.5)
    x, y = batch(2)
    for pipeline in (stashed, replayed):
        torch.manual_seed(7)
        pipeline.step(x, target=y)
    assert _max_difference({n: p.grad for n, p in stashed.named_parameters()},
                           {n: p.grad for n, p in replayed.named_parameters()}) < ATOL


def test_clip_grad_norm_matches_torch_on_the_unsplit_model() -> None:
    pipeline = _local("1f1b", 4, 4)
    model = mlp()
    x, y = batch(0)
    pipeline.step(x, target=y)
    mse(model(x), y).backward()
    ours = pipeline.clip_grad_norm_(0.1)
    theirs = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    assert abs(ours.item() - theirs.item()) < ATOL
    assert _max_difference({n: p.grad for n, p in pipeline.named_parameters()},
                           {n: p.grad for n, p in model.named_parameters()}) < ATOL


def _tied_reference() -> dict:
    model = TiedLM()
    ids, target = _tied_batch()
    token_loss(model(ids), target).backward()
    return {n: p.grad for n, p in model.named_parameters()}


def _tied_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 11, (4, 5), generator=generator), torch.randint(0, 11, (4, 5), generator=generator)


def test_a_parameter_shared_by_two_stages_gets_both_contributions() -> None:
    pipeline = conveyor.LocalPipeline(tied_pipe(TiedLM()), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    ids, target = _tied_batch()
    pipeline.step(ids, target=target)
    assert _max_difference({n: p.grad for n, p in pipeline.named_parameters()}, _tied_reference()) < ATOL


def _copied_tie_pipe() -> conveyor.Pipe:
    """The tied model with a separate copy of the embedding on the last stage (as a traced split has)."""
    model = TiedLM()
    head = _TiedHead(model)
    head.embed = copy.deepcopy(model.embed)
    with torch.no_grad():
        head.embed.weight.add_(1.0)  # deliberately different: the pipeline must align the copies
    pipe = conveyor.Pipe([_Named(embed=model.embed), _Named(mid=model.mid, act=_Tanh()), head])
    pipe.ties = {"embed.weight": [0, 2]}
    return pipe


def test_separate_tied_copies_get_the_summed_gradient_and_stay_equal() -> None:
    pipeline = conveyor.LocalPipeline(_copied_tie_pipe(), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    ids, target = _tied_batch()
    optimizer = torch.optim.Adam(pipeline.parameters(), lr=0.05)
    pipeline.step(ids, target=target)
    copies = [p for n, p in pipeline.named_parameters() if n == "embed.weight"]
    assert len(copies) == 2
    reference = _tied_reference()["embed.weight"]
    assert all((c.grad - reference).abs().max().item() < ATOL for c in copies)
    optimizer.step()
    assert torch.equal(copies[0], copies[1])


def test_a_device_list_of_the_wrong_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="2 devices for 4 ranks"):
        conveyor.LocalPipeline(conveyor.pipeline(mlp(), n_stages=4), schedule="1f1b", n_microbatches=4,
                               loss_fn=mse, devices=["cpu", "cpu"], n_ranks=4)


def test_a_failing_stage_is_named_with_stage_microbatch_and_action() -> None:
    pipeline = _local("1f1b", 4, 4)

    def explode(module: nn.Module, args: object, output: object) -> None:
        raise RuntimeError("boom")

    pipeline.stages[2].module.register_forward_hook(explode)
    x, y = batch(0)
    with pytest.raises(conveyor.PipelineError, match="stage 2, micro-batch 0, action 2F0: RuntimeError: boom"):
        pipeline.step(x, target=y)


def test_a_parameter_shared_across_devices_is_split_into_tied_copies() -> None:
    from conveyor.runtime.local_ties import separate_shared

    pipe = tied_pipe(TiedLM())
    modules = [pipe.stage_module(i) for i in range(3)]
    shared = modules[0].get_parameter("embed.weight")
    devices = [torch.device("cpu"), torch.device("cpu"), torch.device("cuda", 0)]  # compared, never allocated
    assert separate_shared(modules, devices) == {"embed.weight": [0, 2]}
    copy_on_last = modules[2].get_parameter("embed.weight")
    assert modules[0].get_parameter("embed.weight") is shared and copy_on_last is not shared
    assert torch.equal(copy_on_last, shared)


def test_a_parameter_shared_on_one_device_stays_one_tensor() -> None:
    from conveyor.runtime.local_ties import separate_shared

    pipe = tied_pipe(TiedLM())
    modules = [pipe.stage_module(i) for i in range(3)]
    assert separate_shared(modules, [torch.device("cpu")] * 3) == {}
    assert modules[0].get_parameter("embed.weight") is modules[2].get_parameter("embed.weight")


def test_traced_gpt2_with_a_tied_embedding_equals_the_unsplit_model() -> None:
    pytest.importorskip("transformers")
    import trace_workers as tw

    ids, mask, labels = tw.gpt2_batch()
    pipe = conveyor.pipeline(tw.gpt2(), n_stages=4, example_args=(ids[:3, :10],),
                             example_kwargs={"attention_mask": mask[:3, :10]})
    assert pipe.ties == {"transformer.wte.weight": [0, 3]}
    pipeline = conveyor.LocalPipeline(pipe, schedule="1f1b", n_microbatches=4, loss_fn=tw.lm_loss)
    loss = pipeline.step(ids, target=labels, attention_mask=mask)
    model = tw.gpt2()
    reference = tw.lm_loss(model(ids, attention_mask=mask), labels)
    reference.backward()
    assert torch.allclose(loss, reference, atol=1e-5, rtol=1e-4)
    grads = {n: p.grad for n, p in model.named_parameters()}
    for name, parameter in pipeline.named_parameters():
        assert torch.allclose(parameter.grad, grads[name], atol=1e-5, rtol=1e-4), name


def test_an_asynchronous_schedule_is_rejected_with_the_alternatives() -> None:
    with pytest.raises(ValueError, match="LocalPipeline runs synchronous schedules"):
        conveyor.LocalPipeline(conveyor.pipeline(mlp(), n_stages=4), schedule="pipedream", n_microbatches=4,
                               loss_fn=mse)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_the_public_autograd_fallback_gives_the_same_gradients(config: tuple,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # stages call autograd's engine directly; a torch without that entry point uses the public API
    import conveyor.runtime.stage as stage_module

    def grads_of(pipeline: conveyor.LocalPipeline) -> dict:
        x, y = batch(0)
        pipeline.step(x, target=y)
        return {n: p.grad.clone() for n, p in pipeline.named_parameters()}

    direct = grads_of(_local(*config))
    monkeypatch.setattr(stage_module, "_engine_run_backward", None)
    public = grads_of(_local(*config))
    reference, _ = _reference_after_adam(1)
    assert _max_difference(direct, reference) < ATOL
    assert _max_difference(public, reference) < ATOL
