"""runner.generate / LocalPipeline.generate on Hugging Face causal LMs, against model.generate on
the unsplit model (greedy: token-identical), with left-padded prompts of different lengths."""

from __future__ import annotations

import pytest
import torch

import conveyor

pytest.importorskip("transformers")

import hf_workers as hw  # noqa: E402


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def generated(request: pytest.FixtureRequest) -> list[dict]:
    return conveyor.launch(hw.generation_worker, request.param, timeout=240)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_runner_greedy_equals_unsplit_generate(generated: list[dict], model: str) -> None:
    for rank_result in generated:
        result = rank_result[f"{model}-float64"]
        assert torch.equal(result["greedy"], result["expected"])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_runner_stops_each_sequence_at_eos_and_pads_after(generated: list[dict], model: str) -> None:
    result = generated[0][f"{model}-float64"]
    assert result["eos"].shape[1] < hw.PROMPT + hw.NEW  # every sequence finished early: the result is cut
    for rank_result in generated:
        assert torch.equal(rank_result[f"{model}-float64"]["eos"], result["eos_expected"])


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_seeded_sampling_is_deterministic_and_equal_on_every_rank(generated: list[dict], model: str) -> None:
    first = generated[0][f"{model}-float64"]["samples"][0]
    assert not torch.equal(first, generated[0][f"{model}-float64"]["expected"])  # it did sample
    for rank_result in generated:
        for sample in rank_result[f"{model}-float64"]["samples"]:
            assert torch.equal(sample, first)


@pytest.mark.parametrize("model", ["llama", "gpt2"])
def test_sampling_among_the_top_1_is_greedy(generated: list[dict], model: str) -> None:
    result = generated[0][f"{model}-float64"]
    assert torch.equal(result["top_k_1"], result["expected"])


# --- one process -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("model", "n_stages"), [("llama", 4), ("gpt2", 2)])
def test_local_pipeline_greedy_float32_equals_unsplit_generate(model: str, n_stages: int) -> None:
    unsplit = hw.MODELS[model](torch.float32)
    ids, mask = hw.prompts(seed=1)
    pipe = conveyor.pipeline(unsplit, n_stages=n_stages, example_args=(ids[:2],))
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2)
    expected = hw.reference(unsplit, ids, mask)
    assert torch.equal(local.generate(ids, hw.NEW, attention_mask=mask, pad_token_id=0, n_microbatches=3), expected)


def test_generate_refuses_a_pipe_that_is_not_a_causal_lm() -> None:
    pipe = conveyor.pipeline([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=1)
    with pytest.raises(ValueError, match=r"generate\(\) needs a pipe cut from a Hugging Face causal LM"):
        local.generate(torch.zeros(1, 3, dtype=torch.long), 2)


def test_generate_refuses_a_cut_inside_a_decoder_layer() -> None:
    unsplit = hw.llama()
    ids, _ = hw.prompts()
    pipe = conveyor.pipeline(unsplit, split_points=["model.layers.1.mlp"], example_args=(ids[:2],))
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=1)
    with pytest.raises(ValueError, match=r"decoder layer 1 is cut between stages 0 and 1|do not continue"):
        local.generate(ids, 2)


def test_generate_subcommand_trains_and_prints_samples(capfd: pytest.CaptureFixture[str]) -> None:
    from conveyor.cli import main

    assert main(["generate", "--steps", "1", "--max-new-tokens", "4", "--prompt", "ROMEO:", "--prompt", "KING",
                 "--greedy"]) == 0
    samples = [line for line in capfd.readouterr().out.splitlines() if line.startswith(("ROMEO:", "KING"))]
    assert [len(line.rstrip("\n")) for line in samples] == [len("ROMEO:") + 4, len("KING") + 4]
