"""The demo: a character-level transformer trained on Shakespeare with a 4-stage pipeline."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

import torch

import conveyor

from .charlm import CharDataset, char_transformer, generate, lm_loss, load_text

__all__ = ["DemoConfig", "run_demo"]


@dataclass(frozen=True)
class DemoConfig:
    stages: int = 4
    schedule: str = "1f1b"
    microbatches: int = 8
    steps: int = 250
    batch_size: int = 32
    seq_len: int = 64
    width: int = 128
    depth: int = 4
    heads: int = 4
    lr: float = 3e-3
    seed: int = 0
    checkpoint_dir: str | None = None  # save the last step here (step-NNNNNN), as `conveyor train` does
    resume: bool = False               # continue from the latest checkpoint there, up to `steps`


def _worker(rank: int, world_size: int, config: DemoConfig) -> dict:
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())  # its default multiprocessing lock leaks a semaphore per rank

    train_set, val_set = CharDataset(load_text(), "train"), CharDataset(load_text(), "val")
    torch.manual_seed(config.seed)
    model = char_transformer(train_set.vocab_size, width=config.width, depth=config.depth, heads=config.heads,
                             seq_len=config.seq_len)
    pipe = conveyor.pipeline(model, n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule=config.schedule, n_microbatches=config.microbatches,
                                     loss_fn=lm_loss)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=config.lr)
    batches = torch.Generator().manual_seed(config.seed)  # the same batches on every rank
    first = 0
    if config.resume:
        from ..checkpoint import load
        from ..cli_train import latest_checkpoint

        latest = latest_checkpoint(config.checkpoint_dir or "")
        if latest is None:
            raise FileNotFoundError(f"--resume found no checkpoint under {config.checkpoint_dir}")
        first = int(load(runner, latest, optimizer)["step"] or 0)
        for _ in range(first):  # the batches already trained on
            train_set.batch(config.batch_size, config.seq_len, batches)
    shows_progress = runner.stages.get(world_size - 1) is not None
    losses: list[float] = []
    start = time.perf_counter()
    with tqdm(total=config.steps, initial=first, disable=not shows_progress, unit="step", dynamic_ncols=True) as bar:
        for _ in range(first, config.steps):
            inputs, targets = train_set.batch(config.batch_size, config.seq_len, batches)
            optimizer.zero_grad()
            loss = runner.step(inputs, target=targets)
            runner.clip_grad_norm_(1.0)
            optimizer.step()
            if loss is not None:
                losses.append(float(loss))
                elapsed = time.perf_counter() - start
                tokens = len(losses) * config.batch_size * config.seq_len
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}", tok_s=f"{tokens / elapsed:,.0f}")
            bar.update()
    elapsed = time.perf_counter() - start
    if config.checkpoint_dir and first < config.steps:
        from ..checkpoint import save

        save(runner, f"{config.checkpoint_dir}/step-{config.steps:06d}", optimizer, step=config.steps)
    runner.eval()
    inputs, targets = val_set.batch(config.batch_size, config.seq_len, torch.Generator().manual_seed(1))
    logits = runner.forward(inputs)
    val_loss = float(lm_loss(logits, targets)) if logits is not None else None
    return {"state": runner.state_dict(), "losses": losses, "seconds": elapsed, "val_loss": val_loss,
            "peak": runner.peak_stashed, "summary": repr(pipe) if rank == 0 else None}


def run_demo(config: DemoConfig = DemoConfig()) -> dict:
    """Train, report and sample; returns the numbers it printed."""
    print(f"conveyor demo: a {config.depth}-block character transformer on Shakespeare, "
          f"{config.stages} stages on {config.stages} local processes, schedule {config.schedule}, "
          f"{config.microbatches} micro-batches")
    started = time.perf_counter()
    per_rank = conveyor.launch(_worker, config.stages, args=(config,))
    last = per_rank[-1]
    print(per_rank[0]["summary"])
    state: dict = {}
    for result in per_rank:
        state.update(result["state"])
    dataset = CharDataset(load_text(), "train")
    model = char_transformer(dataset.vocab_size, width=config.width, depth=config.depth, heads=config.heads,
                             seq_len=config.seq_len)
    model.load_state_dict(state)
    sample = generate(model, dataset, "MENENIUS:\n", 160, temperature=0.8,
                      generator=torch.Generator().manual_seed(0))
    losses = last["losses"] or [float("nan")]  # nan: resumed at the last step, nothing trained
    steps_done = len(last["losses"])
    tokens = steps_done * config.batch_size * config.seq_len
    report = {
        "first_loss": losses[0], "final_loss": sum(losses[-10:]) / len(losses[-10:]),
        "val_loss": last["val_loss"], "tokens_per_second": tokens / last["seconds"],
        "steps_per_second": steps_done / last["seconds"], "train_seconds": last["seconds"],
        "total_seconds": time.perf_counter() - started, "config": asdict(config),
    }
    print(f"loss {report['first_loss']:.3f} -> {report['final_loss']:.3f} (mean of the last 10 steps), "
          f"validation loss {report['val_loss']:.3f}")
    print(f"throughput {report['tokens_per_second']:,.0f} tokens/s ({report['steps_per_second']:.2f} steps/s), "
          f"training {report['train_seconds']:.1f} s, whole demo {report['total_seconds']:.1f} s")
    print("the unsplit model, loaded from the stages' state dicts, writes:\n" + sample)
    return report
