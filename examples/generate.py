"""Train a small GPT-2 (built from a config) on Shakespeare with a 2-stage pipeline, then sample.

    python examples/generate.py            # or: conveyor generate --model llama --stages 4

``conveyor.pipeline`` traces the model (``use_cache`` is switched off for tracing and training);
``runner.step`` trains it; ``runner.generate`` prefills the prompts through the pipeline and
decodes with a key/value cache on every stage, several sequences in flight (docs/generation.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import conveyor
from conveyor.demo.charlm import load_text
from conveyor.demo.generate import CharTokenizer, build_model

STAGES, STEPS, BLOCK, BATCH = 2, 40, 64, 16
PROMPTS = ("ROMEO:", "JULIET:", "First Citizen:", "KING")


def loss_fn(output, target: torch.Tensor) -> torch.Tensor:  # output: the model's CausalLMOutputWithPast
    return F.cross_entropy(output.logits.flatten(0, 1), target.flatten())


def main(rank: int, world_size: int) -> list[str]:
    torch.manual_seed(0)
    text = load_text()
    tokenizer = CharTokenizer(text)
    data = torch.tensor(tokenizer.encode(text))
    model = build_model("gpt2", tokenizer.vocab_size)
    pipe = conveyor.pipeline(model, n_stages=world_size, example_args=(data[:2 * BLOCK].reshape(2, BLOCK),))
    if rank == 0:
        print(pipe)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=4, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=3e-3)
    for step in range(STEPS):
        starts = torch.randint(0, len(data) - BLOCK - 1, (BATCH,))
        rows = torch.stack([data[s:s + BLOCK + 1] for s in starts.tolist()])
        optimizer.zero_grad()
        loss = runner.step(rows[:, :-1], target=rows[:, 1:])
        optimizer.step()
        if loss is not None and step % 10 == 0:
            print(f"step {step}: loss {float(loss):.3f}")
    ids, mask = tokenizer.batch(PROMPTS)  # left-padded, with an attention mask
    out = runner.generate(ids, 80, attention_mask=mask, pad_token_id=0, do_sample=True, temperature=0.8,
                          top_k=20, generator=torch.Generator().manual_seed(0))
    return [tokenizer.decode(row.tolist()) for row in out]  # the same on every rank


if __name__ == "__main__":
    for sample in conveyor.launch(main, STAGES)[0]:
        print("-" * 60)
        print(sample)
