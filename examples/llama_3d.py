"""3D parallelism: a tiny Llama (Hugging Face ``transformers``) on a pipeline x data x tensor mesh.

    python examples/llama_3d.py                      # 8 local processes: pp2 x dp2 x tp2 (gloo, CPU)
    torchrun --nnodes 2 --nproc-per-node 8 ... examples/llama_3d.py --pp 2 --dp 4 --tp 2   # many nodes

The model is built from a ``LlamaConfig`` (a few layers, small hidden size, ``use_cache=False``),
cut into 2 pipeline stages, and each stage is parallelised by ``parallelize=``: tensor parallelism
inside every decoder layer over ``tp`` (attention heads and MLP columns/rows), then FSDP2 over
``dp`` per decoder layer and per stage. It trains a few steps on the demo's Shakespeare text
(character tokens), each data-parallel replica on its own shard of every batch, writes a checkpoint
(``runner.save``), and prints each step's loss next to the loss of the unsplit Hugging Face model
trained the same way in one process.

Why the model is cut by hand here: ``conveyor.pipeline(model, split_points=...)`` traces the
model with ``torch.export``, which inlines submodule calls, so a traced stage has no decoder-layer
modules for ``fully_shard`` / ``parallelize_module`` to wrap (conveyor refuses per-layer wrapping
of traced stages). :func:`sequential` therefore lays the Hugging Face model's own modules out as
an ``nn.Sequential`` (the token embedding, one wrapper per decoder layer that also computes the
rotary position embedding, the final norm with the LM head), which conveyor cuts by ``balance``
without tracing. Parameter and checkpoint names are the Sequential's (``0.embed_tokens.weight``,
``1.layer.self_attn.q_proj.weight``, ...).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import conveyor
from conveyor.demo.charlm import CharDataset, load_text

__all__ = ["Config", "build_model", "sequential", "balance", "parallelize", "batch", "fit", "train", "train_unsplit",
           "main"]


@dataclass(frozen=True)
class Config:
    pp: int = 2
    dp: int = 2
    tp: int = 2
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2  # grouped-query attention; tensor parallelism splits these, so tp must divide them
    seq: int = 32
    batch: int = 8  # sequences per step over all data-parallel replicas
    microbatches: int = 4
    steps: int = 5
    lr: float = 3e-3
    dtype: str = "float32"
    schedule: str = "1f1b"
    checkpoint: str = ""  # directory for runner.save ("" = a temporary one)


def _tokens() -> tuple[torch.Tensor, int]:
    data = CharDataset(load_text(), "train")
    return data.tokens, data.vocab_size


def build_model(config: Config) -> nn.Module:
    """The unsplit Hugging Face model, initialised from a fixed seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _, vocab = _tokens()
    llama = LlamaConfig(vocab_size=vocab, hidden_size=config.hidden, intermediate_size=2 * config.hidden,
                        num_hidden_layers=config.layers, num_attention_heads=config.heads,
                        num_key_value_heads=config.kv_heads, max_position_embeddings=config.seq,
                        use_cache=False, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    return LlamaForCausalLM(llama).to(getattr(torch, config.dtype))


class Embed(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class Layer(nn.Module):
    """One decoder layer; the rotary embedding is recomputed here (no buffers cross stages)."""

    def __init__(self, layer: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.rotary = rotary

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        # no attention mask: sdpa then applies the causal mask itself, as the unsplit model does
        return self.layer(hidden, position_embeddings=self.rotary(hidden, positions))


class Head(nn.Module):
    def __init__(self, norm: nn.Module, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(hidden))


def sequential(model: nn.Module) -> nn.Sequential:
    """The model's own modules in order: the embedding, one :class:`Layer` per decoder layer, the
    head; the model's forward, cut where conveyor may cut it."""
    import copy

    inner = model.model
    return nn.Sequential(Embed(inner.embed_tokens),
                         *(Layer(layer, copy.deepcopy(inner.rotary_emb)) for layer in inner.layers),
                         Head(inner.norm, model.lm_head))


def balance(n_layers: int, n_stages: int) -> list[int]:
    """Modules per stage: decoder layers spread evenly, the embedding on the first, the head on the last."""
    per_stage = [n_layers // n_stages + (1 if s < n_layers % n_stages else 0) for s in range(n_stages)]
    per_stage[0] += 1
    per_stage[-1] += 1
    return per_stage


def parallelize(stage: nn.Module, mesh: Any) -> nn.Module:
    """Tensor parallelism inside each decoder layer over ``tp``, then FSDP2 over ``dp`` per decoder
    layer and for the stage (torchtitan's order)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    names = mesh.mesh_dim_names
    tp_mesh = mesh["tp"] if "tp" in names and mesh["tp"].size() > 1 else None
    dp_mesh = mesh["dp"] if "dp" in names and mesh["dp"].size() > 1 else None
    for block in stage.children():
        if not isinstance(block, Layer):
            continue
        if tp_mesh is not None:
            plan = {f"self_attn.{name}": ColwiseParallel() for name in ("q_proj", "k_proj", "v_proj")}
            plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                         "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
            parallelize_module(block.layer, tp_mesh, plan)
        if dp_mesh is not None:
            fully_shard(block, mesh=dp_mesh)
    return fully_shard(stage, mesh=dp_mesh) if dp_mesh is not None else stage


def batch(step: int, config: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: ``config.batch`` windows of the text and their next characters."""
    tokens, _ = _tokens()
    generator = torch.Generator().manual_seed(step)
    starts = torch.randint(0, len(tokens) - config.seq - 1, (config.batch,), generator=generator)
    windows = torch.stack([tokens[s:s + config.seq + 1] for s in starts.tolist()])
    return windows[:, :-1], windows[:, 1:]


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def fit(config: Config) -> tuple[conveyor.PipelineRunner, torch.optim.Optimizer, list[float | None]]:
    """On every rank (inside a job): train ``config.steps`` steps on the mesh; the runner, its
    optimizer and the losses step() returned (the global mean over all data-parallel replicas, on
    the last stage's ranks; None elsewhere)."""
    torch.set_num_threads(1)
    mesh = conveyor.mesh(pp=config.pp, dp=config.dp, tp=config.tp)
    pipe = conveyor.pipeline(sequential(build_model(config)), balance=balance(config.layers, config.pp))
    runner = conveyor.PipelineRunner(pipe, mesh=mesh, parallelize=parallelize, schedule=config.schedule,
                                     n_microbatches=config.microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=config.lr)
    replica, shard = mesh["dp"].get_local_rank(), config.batch // config.dp
    losses: list[float | None] = []
    for step in range(config.steps):
        optimizer.zero_grad()
        ids, target = batch(step, config)
        loss = runner.step(ids[replica * shard:(replica + 1) * shard],
                           target=target[replica * shard:(replica + 1) * shard])
        optimizer.step()
        losses.append(None if loss is None else loss.item())
    return runner, optimizer, losses


def result_dir(config: Config) -> str:
    """Where the checkpoint goes: ``--checkpoint``, else a folder in the temporary directory."""
    return config.checkpoint or os.path.join(tempfile.gettempdir(), "conveyor-llama-3d")


def train(rank: int, world_size: int, config: Config) -> dict[str, Any]:
    """Every rank: :func:`fit`, then write a checkpoint with ``runner.save`` (every rank calls it)."""
    runner, optimizer, losses = fit(config)
    directory = result_dir(config)
    runner.save(directory, optimizer, step=config.steps)
    runner.close()
    return {"losses": losses, "checkpoint": directory}


def train_unsplit(config: Config, model: nn.Module | None = None) -> list[float]:
    """The unsplit Hugging Face model (``model``, default :func:`build_model`'s) trained the same
    way in one process on the whole batch; its losses."""
    model = model if model is not None else build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    losses = []
    for step in range(config.steps):
        optimizer.zero_grad()
        ids, target = batch(step, config)
        loss = loss_fn(model(input_ids=ids).logits, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for field, default in asdict(Config()).items():
        parser.add_argument(f"--{field}", type=type(default), default=default)
    config = Config(**vars(parser.parse_args(argv)))
    if config.batch % (config.dp * config.microbatches):
        parser.error("--batch must be a multiple of --dp times --microbatches")
    if "RANK" in os.environ:  # under torchrun: one process per GPU or CPU slot, on any number of nodes
        result = conveyor.run(train, config)
        if result["losses"][-1] is None or int(os.environ["RANK"]) != int(os.environ["WORLD_SIZE"]) - 1:
            return
        losses = result["losses"]
    else:
        results = conveyor.launch(train, config.pp * config.dp * config.tp, args=(config,), timeout=1800)
        losses = results[-1]["losses"]  # the last rank holds the last stage
    reference = train_unsplit(config)
    print(f"{'step':>4}  {'3D loss':>10}  {'unsplit':>10}  {'difference':>10}")
    for step, (ours, unsplit) in enumerate(zip(losses, reference)):
        print(f"{step:>4}  {ours:>10.6f}  {unsplit:>10.6f}  {ours - unsplit:>10.2e}")
    print(f"final loss {losses[-1]:.6f} (unsplit model: {reference[-1]:.6f}); checkpoint: {result_dir(config)}")


if __name__ == "__main__":
    main()
