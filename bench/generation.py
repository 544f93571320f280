"""Benchmark 9: pipelined generation (``runner.generate``) against the unsplit model's
``model.generate`` in one process, in generated tokens per second.

A GPT-2-style Hugging Face model (from a config) generates greedily after a batch of prompts;
the pipeline runs 2 and 4 stages on as many processes with 1 thread each, with one lane (a
micro-batch of sequences with its own KV cache on every stage) or two per stage in flight. The
unsplit model runs in one process with 1 thread, measured just before each pipeline row (the
machine is shared). Every process of the pipeline times the same call after a barrier; the
slowest counts.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .harness import Plan
from .report import Section, Table

__all__ = ["run", "worker"]

SIZES = {  # (layers, width, vocab, batch, prompt, new tokens)
    "full": (8, 256, 512, 16, 32, 64),
    "quick": (4, 128, 256, 8, 16, 32),
}


def _model(layers: int, width: int, vocab: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=4, n_positions=256,
                        bos_token_id=None, eos_token_id=None)
    return GPT2LMHeadModel(config).eval()


def _prompts(vocab: int, batch: int, prompt: int) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0))


def _unsplit(size: tuple, threads: int, repeats: int) -> float:
    layers, width, vocab, batch, prompt, new = size
    torch.set_num_threads(threads)
    model = _model(layers, width, vocab)
    ids = _prompts(vocab, batch, prompt)
    times = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for run in range(repeats + 1):
            started = time.perf_counter()
            model.generate(ids, max_new_tokens=new, do_sample=False, pad_token_id=0)
            if run:
                times.append(time.perf_counter() - started)
    return batch * new / sorted(times)[len(times) // 2]


def worker(rank: int, world_size: int, size: tuple, lanes: int, repeats: int) -> float:
    """Tokens/s of ``runner.generate`` on ``world_size`` stages (the slowest rank's time)."""
    import conveyor

    torch.set_num_threads(1)
    layers, width, vocab, batch, prompt, new = size
    model = _model(layers, width, vocab)
    ids = _prompts(vocab, batch, prompt)
    pipe = conveyor.pipeline(model, n_stages=world_size, example_args=(ids[:2],))
    times = []
    with conveyor.PipelineRunner(pipe, schedule="gpipe", n_microbatches=lanes) as runner:
        for run in range(repeats + 1):
            dist.barrier()
            started = time.perf_counter()
            runner.generate(ids, new, pad_token_id=0, n_microbatches=lanes)
            elapsed = torch.tensor([time.perf_counter() - started])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if run:
                times.append(float(elapsed))
    return batch * new / sorted(times)[len(times) // 2]


def run(plan: Plan, figures: Path) -> Section:
    import conveyor

    started = time.perf_counter()
    quick = plan.rounds == 1
    size = SIZES["quick" if quick else "full"]
    repeats = 3 if quick else 5
    layers, width, vocab, batch, prompt, new = size
    table = Table(["layout", "processes x threads", "lanes in flight", "tokens/s", "unsplit tokens/s (just before)",
                   "vs unsplit"])
    for stages in (2, 4):
        for lanes in (stages, 2 * stages):
            base = _unsplit(size, 1, repeats)  # measured next to each pipeline run: the machine is shared
            rate = conveyor.launch(worker, stages, args=(size, lanes, repeats), threads_per_rank=1)[0]
            table.rows.append([f"runner.generate, {stages} stages", f"{stages} x 1", str(lanes), f"{rate:.0f}",
                               f"{base:.0f}", f"{rate / base:.2f}"])
    threaded = _unsplit(size, 2, repeats)
    base = _unsplit(size, 1, repeats)
    table.rows.append(["unsplit model.generate, 2 threads", "1 x 2", "-", f"{threaded:.0f}", f"{base:.0f}",
                       f"{threaded / base:.2f}"])
    text = [f"GPT-2-style model from a config: {layers} layers, width {width}, vocab {vocab}; {batch} prompts of "
            f"{prompt} tokens, {new} new tokens each, greedy. Tokens/s counts generated tokens (batch x new) over "
            f"the median of {repeats} calls after one warm-up; a pipeline call is timed on every process after a "
            "barrier and the slowest counts. The unsplit model (`model.generate`, 1 thread, its own KV cache) is "
            "measured just before each pipeline row. The pipeline prefills through the stages and decodes with a "
            "KV cache per stage and lane (docs/generation.md)."]
    notes = ["On this 2-core machine 4 processes share 2 cores, so the 4-stage rows show the cost of the messages "
             "and of the pipeline's fill, not a speed-up; a pipeline speeds generation up only when each stage has "
             "its own device, and a small model's decode step (a few hundred microseconds) is of the order of a "
             "message's latency."]
    return Section("generation", "13. Pipelined generation (tokens/s, KV cache per stage and lane)", text=text,
                   tables=[table], notes=notes, seconds=time.perf_counter() - started, short="generation")
