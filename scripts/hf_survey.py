"""Try conveyor on tiny Hugging Face models of many architectures (built from configs, float64):
trace and split into 2 and 4 stages, compare forward outputs and gradients with the unsplit model,
and generate (greedy) where supported. Prints a Markdown table (docs/splitting.md).

    PYTHONPATH=src python scripts/hf_survey.py [name ...]
"""

from __future__ import annotations

import sys
import time
import traceback
import warnings

import torch

import conveyor

warnings.filterwarnings("ignore")
V = 128


def _models() -> dict:
    import transformers as t

    small = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4)
    return {
        "Llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(**small, num_key_value_heads=2)),
        "Qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**small, num_key_value_heads=2)),
        "Mistral": lambda: t.MistralForCausalLM(t.MistralConfig(**small, num_key_value_heads=2)),
        "GPT-2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4)),
        "GPT-NeoX": lambda: t.GPTNeoXForCausalLM(t.GPTNeoXConfig(**small)),
        "OPT": lambda: t.OPTForCausalLM(t.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                                                    num_attention_heads=4, word_embed_proj_dim=32)),
        "Phi": lambda: t.PhiForCausalLM(t.PhiConfig(**small)),
        "Phi-3": lambda: t.Phi3ForCausalLM(t.Phi3Config(**small, pad_token_id=0)),
        "Gemma": lambda: t.GemmaForCausalLM(t.GemmaConfig(**small, num_key_value_heads=2, head_dim=8)),
        "Mixtral": lambda: t.MixtralForCausalLM(t.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4,
                                                                num_experts_per_tok=2,
                                                                experts_implementation="batched_mm")),
        "BERT": lambda: t.BertForMaskedLM(t.BertConfig(**small)),
        "T5": lambda: t.T5ForConditionalGeneration(t.T5Config(vocab_size=V, d_model=32, d_ff=64, d_kv=8, num_layers=4,
                                                              num_heads=4, decoder_start_token_id=0)),
        "ViT": lambda: t.ViTForImageClassification(t.ViTConfig(hidden_size=32, intermediate_size=64,
                                                               num_hidden_layers=4, num_attention_heads=4,
                                                               image_size=16, patch_size=4, num_labels=3)),
    }


def _inputs(name: str) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(0)
    if name == "ViT":
        return (torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64),), {}
    ids = torch.randint(3, V, (4, 8), generator=g)
    if name == "T5":
        return (ids,), {"decoder_input_ids": ids[:, :5]}
    return (ids,), {}


def _first(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _try(name: str, build, n_stages: int) -> str:
    torch.manual_seed(0)
    model = build().double().eval()
    args, kwargs = _inputs(name)
    started = time.perf_counter()
    pipe = conveyor.pipeline(model, n_stages=n_stages, example_args=tuple(a[:2] for a in args),
                             example_kwargs={k: v[:2] for k, v in kwargs.items()})
    seconds = time.perf_counter() - started
    local = conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=2,
                                   loss_fn=lambda out, target: (_first(out) * target).sum())
    expected = _first(model(*args, **kwargs, **({"use_cache": False} if "use_cache" in pipe.description else {})))
    target = torch.randn_like(expected)
    got = _first(local.forward(*args, **kwargs))
    same_forward = torch.allclose(got, expected, atol=1e-10, rtol=0)
    local.step(*args, target=target, **kwargs)
    model.zero_grad()
    (expected * target).sum().backward()
    grads = dict(local.named_parameters())
    worst = max(float((grads[n].grad - p.grad).abs().max()) for n, p in model.named_parameters()
                if p.grad is not None and n in grads and grads[n].grad is not None)
    note = f"trace+split {seconds:.1f} s; forward {'equal' if same_forward else 'DIFFERS'}; grads max diff {worst:.1e}"
    if n_stages == 2:
        try:
            ids = args[0]
            out = local.generate(ids, 5, pad_token_id=0)
            ref = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
            note += "; generate " + ("= model.generate" if torch.equal(out, ref) else "DIFFERS")
        except Exception as error:  # noqa: BLE001
            note += f"; generate: {str(error).split(';')[0][:70]}"
    return note


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    models = _models()
    print("| model | 2 stages | 4 stages |\n|---|---|---|")
    for name in names or list(models):
        cells = []
        for n_stages in (2, 4):
            try:
                cells.append(_try(name, models[name], n_stages))
            except Exception as error:  # noqa: BLE001
                first = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
                cells.append(f"fails: {type(error).__name__}: {first}")
                if "--debug" in sys.argv:
                    traceback.print_exc()
        print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)


if __name__ == "__main__":
    main([a for a in sys.argv[1:] if not a.startswith("--")])
