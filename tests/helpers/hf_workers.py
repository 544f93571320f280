"""Tiny Hugging Face models and launch workers for the generation tests (importable by workers)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

import conveyor

VOCAB = 128
PROMPT = 7
NEW = 9


def llama(dtype: torch.dtype = torch.float64, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def gpt2(dtype: torch.dtype = torch.float64, seed: int = 0) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=4, n_head=4, n_positions=64, bos_token_id=None,
                        eos_token_id=None)
    return GPT2LMHeadModel(config).to(dtype).eval()


MODELS = {"llama": llama, "gpt2": gpt2}


def prompts(seed: int = 0, batch: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths (pad id 0) and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, PROMPT), generator=generator)
    lengths = [PROMPT - 3, PROMPT, PROMPT - 1, PROMPT - 5, PROMPT][:batch]
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, PROMPT - length:] = 1
    return ids.masked_fill(mask == 0, 0), mask


def reference(model: Any, ids: torch.Tensor, mask: torch.Tensor, **options: Any) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **options)


def an_eos(greedy: torch.Tensor) -> list[int]:
    """End-of-sequence ids that stop every greedy continuation by half-way, most rows earlier
    (so sequences finish at different steps and the result is shorter than the maximum)."""
    return sorted({int(token) for token in greedy[:, PROMPT + NEW // 2]})


def generation_worker(rank: int, world_size: int) -> dict:
    """Greedy, EOS and seeded sampling (Llama and GPT-2, float64) through a runner of
    ``world_size`` stages; every result is returned for the tests to compare."""
    torch.set_num_threads(1)
    ids, mask = prompts()
    results: dict = {}
    for name, build in MODELS.items():
        for dtype in (torch.float64,):
            model = build(dtype)
            pipe = conveyor.pipeline(model, n_stages=world_size, example_args=(ids[:2],))
            with conveyor.PipelineRunner(pipe, schedule="gpipe", n_microbatches=2, timeout=120) as runner:
                key = f"{name}-{str(dtype).removeprefix('torch.')}"
                greedy = runner.generate(ids, NEW, attention_mask=mask, pad_token_id=0)
                results[key] = {"greedy": greedy, "expected": reference(model, ids, mask)}
                if dtype is torch.float64:
                    eos = an_eos(results[key]["expected"])
                    results[key]["eos"] = runner.generate(ids, NEW, attention_mask=mask, pad_token_id=0,
                                                          eos_token_id=eos, n_microbatches=3)
                    results[key]["eos_expected"] = reference(model, ids, mask, eos_token_id=eos)
                    samples = [runner.generate(ids, NEW, attention_mask=mask, pad_token_id=0, do_sample=True,
                                               temperature=0.8, top_k=20, top_p=0.9,
                                               generator=torch.Generator().manual_seed(7)) for _ in range(2)]
                    results[key]["samples"] = samples
                    results[key]["top_k_1"] = runner.generate(ids, NEW, attention_mask=mask, pad_token_id=0,
                                                              do_sample=True, top_k=1,
                                                              generator=torch.Generator().manual_seed(3))
    return results


def t5(dtype: torch.dtype = torch.float64, seed: int = 0) -> Any:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=4, num_decoder_layers=4, num_heads=4,
                      decoder_start_token_id=0)
    return T5ForConditionalGeneration(config).to(dtype).eval()


class TwoBlocks(torch.nn.Module):
    """Two linear blocks in a ModuleList (a traced model that cannot be cut into 5 stages)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = torch.tanh(block(x))
        return x


def shipping_worker(rank: int, world_size: int) -> dict:
    """How many times this rank ran torch.export while splitting a Llama in a job, its stages'
    code and outputs, and the error each rank got for a split rank 0 refused."""
    torch.set_num_threads(1)
    calls = [0]
    export = torch.export.export

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return export(*args, **kwargs)

    torch.export.export = counting
    try:
        model = llama()
        ids, _ = prompts()
        pipe = conveyor.pipeline(model, n_stages=world_size, example_args=(ids[:2],))
        value: Any = ids
        for index in range(pipe.n_stages):
            value = pipe.stage_module(index)(value)
        expected = model(ids, use_cache=False).logits
        try:
            conveyor.pipeline(TwoBlocks(), n_stages=5, example_args=(torch.randn(2, 4),))
            refused = ""
        except ValueError as error:
            refused = str(error)
    finally:
        torch.export.export = export
    return {"exports": calls[0], "code": [pipe.stage_module(i).code for i in range(pipe.n_stages)],
            "summary": repr(pipe), "equal": bool(torch.equal(value.logits, expected)), "refused": refused}
