"""Models and launch workers for the traced-splitting tests (importable by worker processes)."""

from __future__ import annotations

import importlib.util
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import conveyor
from conveyor.partition import pipe_split
from conveyor.partition.balance import decide_on_rank_zero

WIDTH = 6
STEPS = 3
GPT2_VOCAB = 100


# --- models --------------------------------------------------------------------------------------
class Block(nn.Module):
    """Returns two tensors, so two values cross the boundary after it."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, h: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tanh(self.lin(h)) + aux, aux * 0.5 + h.mean(dim=-1, keepdim=True)


class Tricky(nn.Module):
    """Cut before blocks.0, blocks.1, blocks.2 into 4 stages, it has: a keyword-only mask used by
    the last stage only, two values per boundary, a skip ``r`` from stage 0 to stage 3, a buffer
    used in stage 2 and ``inp.weight`` tied to ``out.weight`` (stages 0 and 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.out = nn.Linear(WIDTH, WIDTH, bias=False)
        self.out.weight = self.inp.weight
        self.register_buffer("scale", torch.linspace(0.5, 1.5, WIDTH))

    def forward(self, x: torch.Tensor, *, mask: torch.Tensor) -> torch.Tensor:
        r = self.inp(x)
        h, aux = r, r * 0.1
        for index, block in enumerate(self.blocks):
            h, aux = block(h, aux)
            if index == 1:
                h = h * self.scale
        h = h * mask.unsqueeze(-1)
        return self.out(h + r) + aux


def tricky(seed: int = 0) -> Tricky:
    torch.manual_seed(seed)
    return Tricky().double()


TRICKY_SPLITS = ["blocks.0", "blocks.1", "blocks.2"]


def tricky_batch(step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(rows, WIDTH, dtype=torch.float64, generator=generator)
    mask = torch.rand(rows, generator=generator) > 0.3
    y = torch.randn(rows, WIDTH, dtype=torch.float64, generator=generator)
    return x, mask, y


class Stack(nn.Module):
    """Blocks of very different sizes and nothing else: the optimal partition is easy to check."""

    def __init__(self, widths: list[int]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(WIDTH, WIDTH, bias=False) if w == 0 else
                                    nn.Sequential(nn.Linear(WIDTH, w), nn.Linear(w, WIDTH)) for w in widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Marked(nn.Module):
    """Cut by two pipe_split() markers in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = (nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        pipe_split()
        x = torch.relu(self.b(x))
        pipe_split()
        return self.c(x)


class Sleep(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.seconds)
        return x


def sleepy(seed: int = 0) -> nn.Sequential:
    """Light layers and one slow one: balance='time' must give the slow layer a stage of its own."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), Sleep(0.02), nn.Linear(WIDTH, WIDTH))


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.set_verbosity_error()
    config = GPT2Config(n_layer=4, n_embd=64, n_head=4, vocab_size=GPT2_VOCAB, n_positions=64, use_cache=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def gpt2_batch(rows: int = 8, length: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, GPT2_VOCAB, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[::3, :4] = 0  # some left padding
    labels = torch.randint(0, GPT2_VOCAB, (rows, length), generator=generator)
    return ids, mask, labels


# --- losses (module level: picklable) ----------------------------------------------------------------
def mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target)


def lm_loss(output: object, labels: torch.Tensor) -> torch.Tensor:
    logits = output.logits  # type: ignore[attr-defined]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


# --- workers -------------------------------------------------------------------------------------------
def _train(runner: conveyor.PipelineRunner, batches: list, optimizer: type, lr: float) -> dict:
    """The runner sums each tied parameter's gradient over the stages holding it after step()."""
    optim = optimizer(runner.parameters(), lr=lr)
    out: dict = {"losses": []}
    for step, (args, kwargs, target) in enumerate(batches):
        optim.zero_grad()
        out["losses"].append(runner.step(*args, target=target, **kwargs))
        if step == 0:
            out["grads"] = {n: p.grad.clone() for n, p in runner.named_parameters()}
        optim.step()
    out["weights"] = {n: p.detach().clone() for n, p in runner.named_parameters()}
    return out


def traced_training(rank: int, world_size: int) -> dict:
    """Tricky (float64, split points; built for real and on meta) and GPT-2 (float32, balanced)
    on 4 ranks; plus rank 0's profiled decision reaching every rank."""
    torch.manual_seed(1234)
    results: dict = {}
    x, mask, _ = tricky_batch(0)
    batches = [((x,), {"mask": m}, y) for x, m, y in (tricky_batch(step) for step in range(STEPS))]
    pipe = conveyor.pipeline(tricky(), split_points=TRICKY_SPLITS, example_args=(x,), example_kwargs={"mask": mask})
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=2, loss_fn=mse)
    results["tricky"] = _train(runner, batches, torch.optim.Adam, 0.01)
    results["ties"] = pipe.ties

    with torch.device("meta"):
        meta_model = Tricky().double()
    pipe = conveyor.pipeline(meta_model, split_points=TRICKY_SPLITS, example_args=(x,),
                             example_kwargs={"mask": mask})
    runner = conveyor.PipelineRunner(pipe, schedule="gpipe", n_microbatches=2, loss_fn=mse)
    runner.load_state_dict(tricky().state_dict(), strict=False)
    results["meta"] = _train(runner, batches[:1], torch.optim.SGD, 0.1)

    if importlib.util.find_spec("transformers") is not None:
        results.update(_gpt2_part(world_size))
    results["decided"] = decide_on_rank_zero(lambda: rank)
    pipe = conveyor.pipeline(sleepy(), n_stages=3, balance="time", example_args=(x.float(),))
    results["time_costs"] = pipe.costs
    results["time_stages"] = [list(pipe.stage_module(i)._modules) for i in range(pipe.n_stages)]
    return results


def _gpt2_part(world_size: int) -> dict:
    results: dict = {}
    ids, attention, labels = gpt2_batch()
    # traced on another batch size and sequence length than it runs with: shapes stay symbolic
    pipe = conveyor.pipeline(gpt2(), n_stages=world_size, example_args=(ids[:3, :10],),
                             example_kwargs={"attention_mask": attention[:3, :10]})
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=4, loss_fn=lm_loss)
    results["gpt2"] = _train(runner, [((ids,), {"attention_mask": attention}, labels)], torch.optim.SGD, 0.1)
    results["gpt2_ties"] = pipe.ties
    results["gpt2_repr"] = repr(pipe)
    results["gpt2_names"] = [n for n, _ in runner.named_parameters()]
    return results
