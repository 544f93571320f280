"""``conveyor generate``: a small Hugging Face causal LM (GPT-2 or Llama, built from a config)
on the demo's Shakespeare text, trained for a few steps on a pipeline, then sampled with
``runner.generate`` (prefill through the pipeline, decode with a KV cache on every stage)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["GenerateConfig", "CharTokenizer", "build_model", "run_generate"]


@dataclass(frozen=True)
class GenerateConfig:
    model: str = "gpt2"          # "gpt2" or "llama"
    stages: int = 2              # pipeline stages = local processes
    steps: int = 30              # training steps before sampling
    batch_size: int = 16
    block: int = 64              # training sequence length
    microbatches: int = 4
    prompts: tuple[str, ...] = ("ROMEO:", "JULIET:", "First Citizen:", "KING")
    max_new_tokens: int = 80
    greedy: bool = False
    temperature: float = 0.8
    top_k: int | None = 20
    top_p: float | None = None
    seed: int = 0
    layers: int = 4
    width: int = 64


class CharTokenizer:
    """Characters of the text as token ids; id 0 is padding."""

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.index = {c: i + 1 for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> list[int]:
        return [self.index[c] for c in text if c in self.index]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 1] for i in ids if 0 < i <= len(self.chars))

    def batch(self, prompts: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and their attention mask."""
        encoded = [self.encode(p) for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.zeros((len(encoded), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(encoded):
            ids[row, width - len(tokens):] = torch.tensor(tokens)
            mask[row, width - len(tokens):] = 1
        return ids, mask


def build_model(kind: str, vocab_size: int, *, layers: int = 4, width: int = 64, positions: int = 512) -> Any:
    """A GPT-2 or Llama causal LM from a config (no download)."""
    if kind == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=width, n_layer=layers, n_head=4,
                                          n_positions=positions, bos_token_id=None, eos_token_id=None))
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=positions, bos_token_id=None,
                                            eos_token_id=None, pad_token_id=None))
    raise ValueError(f"unknown model {kind!r}: choose 'gpt2' or 'llama'")


def _loss(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = output.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _worker(rank: int, world_size: int, config: GenerateConfig) -> list[str] | None:
    import conveyor
    from conveyor.demo.charlm import load_text

    torch.manual_seed(config.seed)
    text = load_text()
    tokenizer = CharTokenizer(text)
    data = torch.tensor(tokenizer.encode(text))
    model = build_model(config.model, tokenizer.vocab_size, layers=config.layers, width=config.width)
    example = data[:2 * config.block].reshape(2, config.block)
    pipe = conveyor.pipeline(model, n_stages=config.stages, example_args=(example,))
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=config.microbatches, loss_fn=_loss)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(config.seed)
    started = time.perf_counter()
    for step in range(config.steps):
        starts = torch.randint(0, len(data) - config.block - 1, (config.batch_size,), generator=batches)
        rows = torch.stack([data[s:s + config.block + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        loss = runner.step(rows[:, :-1], target=rows[:, 1:])
        optimizer.step()
        if loss is not None and (step % 10 == 0 or step == config.steps - 1):
            print(f"step {step:4d}  loss {float(loss):.3f}", flush=True)
    trained = time.perf_counter() - started
    ids, mask = tokenizer.batch(config.prompts)
    started = time.perf_counter()
    out = runner.generate(ids, config.max_new_tokens, attention_mask=mask, pad_token_id=0,
                          do_sample=not config.greedy, temperature=config.temperature, top_k=config.top_k,
                          top_p=config.top_p, generator=torch.Generator().manual_seed(config.seed))
    seconds = time.perf_counter() - started
    runner.close()
    if rank != 0:
        return None
    new = out.shape[0] * (out.shape[1] - ids.shape[1])
    print(f"trained {config.steps} steps in {trained:.1f} s; generated {new} tokens in {seconds:.2f} s "
          f"({new / seconds:.0f} tokens/s, {config.stages} stages, {len(config.prompts)} sequences in flight)")
    return [tokenizer.decode(row.tolist()) for row in out]


def run_generate(config: GenerateConfig) -> list[str]:
    """Train and sample on ``config.stages`` local processes; prints and returns the samples."""
    import conveyor

    if config.stages < 1:
        raise ValueError(f"--stages must be at least 1, got {config.stages}")
    texts = conveyor.launch(_worker, config.stages, args=(config,))[0]
    for text in texts:
        print("-" * 60)
        print(text)
    return texts
