"""Traced splitting of arbitrary modules: what crosses boundaries, ties, balancing, meta models,
markers, errors; gradients of a traced split equal the unsplit model's."""

from __future__ import annotations

import inspect
import itertools
import re

import pytest
import torch
import torch.nn as nn

import conveyor
from conveyor.partition import TraceError, pipe_split

import trace_workers as tw

ATOL = 1e-10


def _tricky_pipe(model: nn.Module | None = None) -> conveyor.Pipe:
    x, mask, _ = tw.tricky_batch(0)
    return conveyor.pipeline(model if model is not None else tw.tricky(), split_points=tw.TRICKY_SPLITS,
                             example_args=(x,), example_kwargs={"mask": mask})


# --- single process ------------------------------------------------------------------------------------
def test_stages_run_in_sequence_give_the_unsplit_output_and_gradients() -> None:
    pipe, reference = _tricky_pipe(), tw.tricky()
    x, mask, _ = tw.tricky_batch(5, rows=3)  # another batch size than the example's
    value = pipe.stage_module(0)(x, mask=mask)
    for index in range(1, pipe.n_stages):
        value = pipe.stage_module(index)(value)
    value.sum().backward()
    expected = reference(x, mask=mask)
    expected.sum().backward()
    assert torch.allclose(value, expected, atol=ATOL, rtol=0)
    grads = {}
    for index in range(pipe.n_stages):
        for name, parameter in pipe.stage_module(index).named_parameters():
            grads[name] = parameter.grad
    for name, parameter in reference.named_parameters():
        assert torch.allclose(grads[name], parameter.grad, atol=ATOL, rtol=0), name


class _DictOut(nn.Module):
    """Takes a positional and a keyword input, returns a dict holding a tuple: a pytree both ways."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(tw.WIDTH, tw.WIDTH)
        self.b = nn.Linear(tw.WIDTH, tw.WIDTH)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> dict:
        h = self.a(x) + bias
        return {"out": self.b(h), "parts": (h, x * 2)}


def test_stage_modules_take_the_model_signature_and_return_pytrees() -> None:
    """graph_split keeps torch.fx's private _PyTreeCodeGen (torch has no public code generator that
    takes and returns pytrees): this pins what it does on the installed torch. Stage 0 is called
    like the model (by position or by name), a later stage with the one value it receives, and the
    last stage returns the model's own output structure."""
    torch.manual_seed(0)
    model = _DictOut().double()
    x, bias = torch.randn(3, tw.WIDTH, dtype=torch.float64), torch.randn(tw.WIDTH, dtype=torch.float64)
    pipe = conveyor.pipeline(model, split_points=["b"], example_args=(x, bias))
    first, last = pipe.stage_module(0), pipe.stage_module(1)
    assert list(inspect.signature(first.forward).parameters) == ["x", "bias"]
    positional, by_name = first(x, bias), first(x=x, bias=bias)
    assert all(torch.equal(p, n) for p, n in zip(positional, by_name))
    out, expected = last(positional), model(x, bias)
    assert set(out) == {"out", "parts"} and isinstance(out["parts"], tuple)
    assert torch.allclose(out["out"], expected["out"], atol=ATOL, rtol=0)
    assert all(torch.allclose(o, e, atol=ATOL, rtol=0) for o, e in zip(out["parts"], expected["parts"]))


def test_stage_modules_use_the_unsplit_models_parameter_and_buffer_names() -> None:
    pipe = _tricky_pipe()
    names = [set(dict(pipe.stage_module(i).named_parameters())) | set(dict(pipe.stage_module(i).named_buffers()))
             for i in range(4)]
    assert names == [{"inp.weight", "inp.bias"}, {"blocks.0.lin.weight", "blocks.0.lin.bias"},
                     {"blocks.1.lin.weight", "blocks.1.lin.bias", "scale"}, {"blocks.2.lin.weight",
                                                                              "blocks.2.lin.bias", "inp.weight"}]


def test_skip_connection_and_keyword_mask_travel_through_the_middle_stages() -> None:
    pipe = _tricky_pipe()
    # stage 0 -> 1: h, aux (from inp: the same value r, and r * 0.1), r, mask; later: h, aux, r, mask
    assert [len(b) for b in pipe.boundaries] == [3, 4, 4]
    assert all(any(d.startswith("bool") for d in b) for b in pipe.boundaries)


def test_tied_parameter_is_held_by_both_stages_and_recorded() -> None:
    pipe = _tricky_pipe()
    assert pipe.ties == {"inp.weight": [0, 3]}
    assert pipe.stage_module(0).get_parameter("inp.weight") is pipe.stage_module(3).get_parameter("inp.weight")
    assert "tied: inp.weight on stages 0, 3" in repr(pipe)


def test_split_point_at_the_end_of_a_module_cuts_after_it() -> None:
    x, mask, _ = tw.tricky_batch(0)
    pipe = conveyor.pipeline(tw.tricky(), split_points={"blocks.1": "end"}, example_args=(x,),
                             example_kwargs={"mask": mask})
    assert pipe.n_stages == 2
    assert "blocks.1.lin.weight" in dict(pipe.stage_module(0).named_parameters())
    assert "scale" in dict(pipe.stage_module(1).named_buffers())  # used after blocks.1 returns


def test_pipe_split_markers_cut_where_they_run() -> None:
    torch.manual_seed(0)
    model = tw.Marked()
    x = torch.randn(4, tw.WIDTH)
    pipe = conveyor.pipeline(model, example_args=(x,))
    assert [sorted({n.split(".")[0] for n, _ in pipe.stage_module(i).named_parameters()}) for i in range(3)] == \
        [["a"], ["b"], ["c"]]
    value = x
    for index in range(3):
        value = pipe.stage_module(index)(value) if index else pipe.stage_module(0)(x)
    assert torch.equal(value, model(x))  # eagerly, pipe_split() does nothing


class _Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(tw.WIDTH, tw.WIDTH), nn.Linear(tw.WIDTH, tw.WIDTH)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(self.a(x)))


def test_dropout_in_a_traced_stage_follows_train_and_eval() -> None:
    torch.manual_seed(0)
    model, x = _Noisy(), torch.randn(64, tw.WIDTH)
    pipe = conveyor.pipeline(model, split_points=["b"], example_args=(x,))
    stage = pipe.stage_module(0)
    assert not torch.equal(stage(x), model.a(x))  # traced in training mode: dropout active
    stage.eval()
    assert torch.equal(stage(x), model.a(x))


def _best_max(costs: list[int], parts: int) -> int:
    cuts = itertools.combinations(range(1, len(costs)), parts - 1)
    return min(max(sum(costs[a:b]) for a, b in zip((0, *c), (*c, len(costs)))) for c in cuts)


@pytest.mark.parametrize("widths, parts", [([40, 1, 1, 1, 40, 1, 1, 40], 3), ([5, 60, 5, 5, 5, 30, 30], 4),
                                            ([0, 0, 0, 100, 0, 0], 2)])
def test_balance_by_params_finds_the_optimal_contiguous_partition(widths: list[int], parts: int) -> None:
    torch.manual_seed(0)
    model = tw.Stack(widths)
    costs = [sum(p.numel() for p in layer.parameters()) for layer in model.layers]
    pipe = conveyor.pipeline(model, n_stages=parts, example_args=(torch.randn(2, tw.WIDTH),))
    held = [sum(p.numel() for p in pipe.stage_module(i).parameters()) for i in range(parts)]
    assert sum(held) == sum(costs)
    assert max(held) == _best_max(costs, parts) == max(pipe.costs)


def test_meta_model_is_split_without_allocating_storage() -> None:
    with torch.device("meta"):
        model = tw.Tricky().double()
    pipe = _tricky_pipe(model)
    tensors = [t for i in range(4) for t in [*pipe.stage_module(i).parameters(), *pipe.stage_module(i).buffers()]]
    assert tensors and all(t.is_meta for t in tensors)
    assert pipe.ties == {"inp.weight": [0, 3]}


# --- errors ------------------------------------------------------------------------------------------
def test_unknown_split_point_lists_close_matches() -> None:
    x, mask, _ = tw.tricky_batch(0)
    with pytest.raises(ValueError, match=r"split point 'block.1' is not a submodule of Tricky; did you mean "
                                         r"'blocks.1'"):
        conveyor.pipeline(tw.tricky(), split_points=["block.1"], example_args=(x,), example_kwargs={"mask": mask})


def test_split_points_out_of_execution_order_are_refused() -> None:
    x, mask, _ = tw.tricky_batch(0)
    with pytest.raises(ValueError, match=r"out of execution order: the beginning of blocks.0 does not come after "
                                         r"the beginning of blocks.2 in the forward; list split points in the order"):
        conveyor.pipeline(tw.tricky(), split_points=["blocks.2", "blocks.0"], example_args=(x,),
                          example_kwargs={"mask": mask})


def test_more_stages_than_blocks_is_refused() -> None:
    with pytest.raises(ValueError, match=r"cannot cut Stack into 4 stages: it has 3 cuttable blocks \(the 3 blocks "
                                         r"of layers\); use at most 3 stages, or pass split_points"):
        conveyor.pipeline(tw.Stack([1, 2, 3]), n_stages=4, example_args=(torch.randn(2, tw.WIDTH),))


class _ValueDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(tw.WIDTH, tw.WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # control flow on a tensor's value: no single graph
            return self.lin(x)
        return x


def test_untraceable_forward_explains_the_ways_out() -> None:
    with pytest.raises(TraceError, match=r"torch.export could not capture _ValueDependent.forward: .*\nHow to fix: "
                                         r"pass example_args=.*pass a list of stage modules.*pipe_split\(\) markers"):
        conveyor.pipeline(_ValueDependent(), n_stages=1, example_args=(torch.randn(2, tw.WIDTH),))


def test_tracing_without_example_inputs_is_refused() -> None:
    with pytest.raises(ValueError, match=r"tracing Stack needs example inputs: pass example_args="):
        conveyor.pipeline(tw.Stack([1, 2]), n_stages=2)


def test_balance_by_time_without_example_inputs_is_refused() -> None:
    with pytest.raises(ValueError, match=r"balance='time' profiles the model and needs example inputs"):
        conveyor.pipeline(tw.sleepy(), n_stages=2, balance="time")


def test_balance_by_time_on_a_meta_model_is_refused() -> None:
    with torch.device("meta"):
        model = tw.Stack([1, 2])
    with pytest.raises(ValueError, match=re.escape("balance='time' cannot profile Stack: it is on the meta device "
                                                   "and its weights have no storage; use balance='params'")):
        conveyor.pipeline(model, n_stages=2, balance="time", example_args=(torch.randn(2, tw.WIDTH),))


class _PlainTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(tw.WIDTH, tw.WIDTH)
        self.offset = torch.ones(tw.WIDTH)  # neither parameter nor buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.offset


def test_plain_tensor_attribute_made_on_meta_is_refused() -> None:
    with torch.device("meta"):
        model = _PlainTensor()
    with pytest.raises(ValueError, match=r"'offset' is a plain tensor attribute .* register it as a buffer"):
        conveyor.pipeline(model, n_stages=1, example_args=(torch.randn(2, tw.WIDTH),))


def test_pipe_split_outside_tracing_is_a_no_op() -> None:
    assert pipe_split() is None


# --- four ranks --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained() -> list[dict]:
    return conveyor.launch(tw.traced_training, 4, timeout=240)


def _merged(per_rank: list[dict], model: str, key: str) -> dict:
    merged: dict = {}
    for result in per_rank:
        merged.update(result[model][key])
    return merged


def _reference_tricky(steps: int, optimizer: type, lr: float) -> tuple[dict, dict]:
    model = tw.tricky()
    optim = optimizer(model.parameters(), lr=lr)
    grads: dict = {}
    for step in range(steps):
        optim.zero_grad()
        x, mask, y = tw.tricky_batch(step)
        tw.mse(model(x, mask=mask), y).backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optim.step()
    return grads, {n: p.detach() for n, p in model.named_parameters()}


def test_traced_split_gradients_equal_the_unsplit_model(trained: list[dict]) -> None:
    grads, _ = _reference_tricky(1, torch.optim.Adam, 0.01)
    ours = _merged(trained, "tricky", "grads")
    assert ours.keys() == grads.keys()
    for name in grads:
        assert torch.allclose(ours[name], grads[name], atol=ATOL, rtol=0), name


def test_every_stage_holding_a_tied_parameter_gets_the_summed_gradient(trained: list[dict]) -> None:
    grads, _ = _reference_tricky(1, torch.optim.Adam, 0.01)
    for rank in (0, 3):
        assert torch.allclose(trained[rank]["tricky"]["grads"]["inp.weight"], grads["inp.weight"], atol=ATOL, rtol=0)


def test_weights_after_three_adam_steps_equal_the_unsplit_model(trained: list[dict]) -> None:
    _, weights = _reference_tricky(tw.STEPS, torch.optim.Adam, 0.01)
    ours = _merged(trained, "tricky", "weights")
    for name in weights:
        assert torch.allclose(ours[name], weights[name], atol=ATOL, rtol=0), name


def test_tied_copies_stay_bit_identical(trained: list[dict]) -> None:
    assert trained[0]["ties"] == {"inp.weight": [0, 3]}
    assert torch.equal(trained[0]["tricky"]["weights"]["inp.weight"], trained[3]["tricky"]["weights"]["inp.weight"])


def test_meta_built_split_trains_like_the_unsplit_model_once_loaded(trained: list[dict]) -> None:
    _, weights = _reference_tricky(1, torch.optim.SGD, 0.1)
    ours = _merged(trained, "meta", "weights")
    for name in weights:
        assert torch.allclose(ours[name], weights[name], atol=ATOL, rtol=0), name


def test_gpt2_split_four_ways_has_the_unsplit_gradients(trained: list[dict]) -> None:
    pytest.importorskip("transformers")
    model = tw.gpt2()
    ids, mask, labels = tw.gpt2_batch()
    loss = tw.lm_loss(model(ids, attention_mask=mask), labels)
    loss.backward()
    assert torch.allclose(trained[3]["gpt2"]["losses"][0], loss, atol=1e-5, rtol=1e-4)
    ours = _merged(trained, "gpt2", "grads")
    assert ours.keys() == dict(model.named_parameters()).keys()
    for name, parameter in model.named_parameters():
        assert torch.allclose(ours[name], parameter.grad, atol=1e-5, rtol=1e-4), name
    assert trained[0]["gpt2_ties"] == {"transformer.wte.weight": [0, 3]}


def test_balanced_gpt2_gets_one_block_per_stage_and_ties_the_embedding(trained: list[dict]) -> None:
    pytest.importorskip("transformers")
    for rank, result in enumerate(trained):
        blocks = {n.split(".")[2] for n in result["gpt2_names"] if n.startswith("transformer.h.")}
        assert blocks == {str(rank)}
    assert "transformer.wte.weight" in trained[0]["gpt2_names"] and "transformer.wte.weight" in trained[3]["gpt2_names"]
    assert "among the 4 blocks of transformer.h" in trained[0]["gpt2_repr"]
    assert "tied: transformer.wte.weight on stages 0, 3" in trained[0]["gpt2_repr"]


def test_profiled_split_is_decided_on_rank_zero_for_every_rank(trained: list[dict]) -> None:
    assert [result["decided"] for result in trained] == [0, 0, 0, 0]
    assert all(result["time_costs"] == trained[0]["time_costs"] for result in trained)


def test_balance_by_time_gives_the_slow_layer_a_stage_of_its_own(trained: list[dict]) -> None:
    assert trained[0]["time_stages"] == [["0", "1"], ["2"], ["3"]]
