"""Hugging Face models through conveyor.pipeline: defaults that trace, frozen non-tensor
arguments checked, the model's own output type returned."""

from __future__ import annotations

import collections
import dataclasses
from typing import NamedTuple

import pytest
import torch

import conveyor
from conveyor.partition import TraceError
from conveyor.runtime.bundle import flatten, unflatten

pytest.importorskip("transformers")

import hf_workers as hw  # noqa: E402


@pytest.fixture(scope="module")
def llama_pipe() -> tuple:
    model = hw.llama()
    ids, _ = hw.prompts()
    return model, ids, conveyor.pipeline(model, n_stages=2, example_args=(ids[:2],))


def test_use_cache_is_switched_off_for_tracing_and_said_in_the_summary(llama_pipe: tuple) -> None:
    _, _, pipe = llama_pipe
    assert "set use_cache=False for tracing and training" in repr(pipe)


def test_forward_returns_the_models_output_type_with_its_values(llama_pipe: tuple) -> None:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    model, ids, pipe = llama_pipe
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
    output = local.forward(ids)
    assert type(output) is CausalLMOutputWithPast
    torch.testing.assert_close(output.logits, model(ids, use_cache=False).logits, atol=1e-10, rtol=0)


def test_a_frozen_argument_that_differs_from_the_trace_is_refused_naming_it(llama_pipe: tuple) -> None:
    _, ids, pipe = llama_pipe
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
    with pytest.raises(conveyor.PipelineError, match=r"argument 'use_cache' is True but LlamaForCausalLM was traced "
                                                     r"with use_cache=False"):
        local.forward(ids, use_cache=True)


def test_an_argument_absent_from_the_trace_is_refused_naming_it(llama_pipe: tuple) -> None:
    _, ids, pipe = llama_pipe
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
    with pytest.raises(conveyor.PipelineError, match=r"argument 'attention_mask' was not given when LlamaForCausalLM "
                                                     r"was traced"):
        local.forward(ids, attention_mask=torch.ones_like(ids))


def test_inputs_given_by_name_and_the_traced_value_given_again_run(llama_pipe: tuple) -> None:
    model, ids, pipe = llama_pipe
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
    output = local.forward(input_ids=ids, use_cache=False)
    torch.testing.assert_close(output.logits, model(ids, use_cache=False).logits, atol=1e-10, rtol=0)


def test_an_export_failure_with_a_cache_names_use_cache() -> None:
    ids, _ = hw.prompts()
    with pytest.raises(TraceError, match=r"Usual fixes for LlamaForCausalLM:\n  - pass example_kwargs="
                                         r"\{'use_cache': False\}"):
        conveyor.pipeline(hw.llama(), n_stages=2, example_args=(ids[:2],), example_kwargs={"use_cache": True})


# --- output types survive the merge of micro-batches ------------------------------------------------
@dataclasses.dataclass
class _Output:
    logits: torch.Tensor
    extra: torch.Tensor | None = None


class _Pair(NamedTuple):
    a: torch.Tensor
    b: torch.Tensor


class _Ordered(collections.OrderedDict):
    pass


@pytest.mark.parametrize("value", [_Output(torch.ones(2, 3)), _Pair(torch.ones(2), torch.zeros(2, 1)),
                                   _Ordered(x=torch.ones(2)), {"x": torch.ones(2)}],
                         ids=["dataclass", "namedtuple", "dict-subclass", "dict"])
def test_typed_outputs_round_trip_with_their_type(value: object) -> None:
    structure, tensors = flatten(value)
    rebuilt = unflatten(structure, tensors)
    assert type(rebuilt) is type(value)
    assert all(a is b for a, b in zip(flatten(rebuilt)[1], tensors))


def test_local_pipeline_merges_a_dataclass_output_into_a_dataclass() -> None:
    class Head(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> _Output:
            return _Output(x * 2)

    pipe = conveyor.pipeline([torch.nn.Linear(3, 3), Head()])
    output = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2).forward(torch.ones(4, 3))
    assert type(output) is _Output and output.logits.shape == (4, 3) and output.extra is None


# --- encoder-decoder balance ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def t5_case() -> tuple:
    model = hw.t5()
    ids, _ = hw.prompts()
    return model, ids, ids[:, :5]


@pytest.mark.parametrize(("n_stages", "limit"), [(2, 1.15), (4, 1.3)])
def test_t5_is_balanced_among_encoder_and_decoder_blocks(t5_case: tuple, n_stages: int, limit: float) -> None:
    model, ids, decoder_ids = t5_case
    pipe = conveyor.pipeline(model, n_stages=n_stages, example_args=(ids[:2],),
                             example_kwargs={"decoder_input_ids": decoder_ids[:2]})
    assert "blocks of encoder.block and decoder.block" in pipe.description
    held = [sum(p.numel() for p in pipe.stage_module(i).parameters()) for i in range(n_stages)]  # ties on each
    assert max(held) <= limit * sum(held) / n_stages
    if n_stages == 2:
        local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
        expected = model(ids, decoder_input_ids=decoder_ids, use_cache=False).logits
        torch.testing.assert_close(local.forward(ids, decoder_input_ids=decoder_ids).logits, expected,
                                   atol=1e-10, rtol=0)
