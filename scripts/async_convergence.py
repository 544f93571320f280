"""Convergence of the asynchronous schedules on the demo's character model (docs/async.md).

Trains the demo's 4-block character transformer on *Coriolanus* with 4 stages on 4 processes,
over the same stream of batches (the same samples in the same order) with ``1f1b``,
``pipedream`` and ``pipedream-2bw``, and writes the loss curves and final numbers.

    python scripts/async_convergence.py [--batches 250] [--out docs/figures/async_convergence.png]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

import conveyor
from conveyor.demo.charlm import CharDataset, char_transformer, lm_loss, load_text

N_STAGES = 4
N_MICROBATCHES = 8
BATCH = 32
SEQ_LEN = 64
# 1F1B updates on the mean gradient of 32 sequences; 2BW on 16 (a window of 4 micro-batches), one window
# late; PipeDream after every micro-batch of 4. What we tried (validation loss; 1F1B's in brackets):
# constant 3e-3, no warm-up or clipping: 2BW (window 4) 2.76 [2.45], 2BW (window 8) 3.19; constant 1e-3:
# PipeDream 2.45, 2BW (window 8) 2.69 [2.21]; warm-up + cosine, 1e-3: 2BW (window 8) 2.56 [2.30]; 5e-4:
# 2BW (window 8) 2.50, PipeDream 2.25, 2BW (window 4) 2.37. A one-update-stale gradient costs Adam
# a lot at a high rate here: in one process, delaying the gradient by one step took the loss after 120
# steps at a constant 1e-3 from 2.38 to 3.05.
LEARNING_RATES = {"1f1b": 1e-3, "pipedream-2bw": 5e-4, "pipedream": 5e-4}
OPTIONS: dict[str, dict] = {}  # 2BW: the default window, the number of stages (4 micro-batches)
UPDATES_PER_BATCH: dict[str, float] = {"1f1b": 1, "pipedream-2bw": N_MICROBATCHES / N_STAGES,
                                       "pipedream": N_MICROBATCHES}
WARMUP = 0.1  # of the updates: linear warm-up, then cosine decay to 0 (the same shape for every run)


def _warmup_cosine(total: int) -> Callable[[int], float]:
    warmup = max(1, int(WARMUP * total))

    def factor(update: int) -> float:
        if update < warmup:
            return (update + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (update - warmup) / max(1, total - warmup))))

    return factor


def _batches(n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train_set = CharDataset(load_text(), "train")
    generator = torch.Generator().manual_seed(0)
    return [train_set.batch(BATCH, SEQ_LEN, generator) for _ in range(n_batches)]


def _worker(rank: int, world_size: int, schedule: str, n_batches: int, lr: float, options: dict,
            updates: int) -> dict:
    train_set, val_set = CharDataset(load_text(), "train"), CharDataset(load_text(), "val")
    torch.manual_seed(0)
    model = char_transformer(train_set.vocab_size, width=128, depth=4, heads=4, seq_len=SEQ_LEN)
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=world_size), schedule=schedule,
                                     n_microbatches=N_MICROBATCHES, loss_fn=lm_loss, **options)
    optimizer = torch.optim.AdamW(runner.parameters(), lr=lr)
    schedule_lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(updates))
    optimizer.register_step_post_hook(lambda *_: schedule_lr.step())  # stream() steps the optimizer itself
    batches = _batches(n_batches)
    losses: list[float] = []
    start = time.perf_counter()
    if runner.schedule.is_streaming:
        losses = [float(loss) for loss in runner.stream(batches, optimizer)]
    else:
        for inputs, targets in batches:
            optimizer.zero_grad()
            loss = runner.step(inputs, target=targets)
            optimizer.step()
            if loss is not None:
                losses.append(float(loss))
    seconds = time.perf_counter() - start
    runner.eval()
    val_losses = []
    generator = torch.Generator().manual_seed(1)
    for _ in range(8):
        inputs, targets = val_set.batch(BATCH, SEQ_LEN, generator)
        logits = runner.forward(inputs)
        if logits is not None:
            val_losses.append(float(lm_loss(logits, targets)))
    return {"losses": losses, "seconds": seconds, "val": sum(val_losses) / len(val_losses) if val_losses else None,
            "versions": runner.peak_versions}


def _per_batch(losses: list[float], per_batch: int) -> list[float]:
    return [sum(losses[i:i + per_batch]) / per_batch for i in range(0, len(losses), per_batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=250)
    parser.add_argument("--out", type=Path, default=Path("docs/figures/async_convergence.png"))
    parser.add_argument("--window", type=int, default=None, help="2BW's window (default: the batch's micro-batches)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="SCHEDULE=LR", help="override a learning rate")
    parser.add_argument("--only", nargs="+", default=list(LEARNING_RATES), help="rerun only these schedules "
                        "(the others are read back from the JSON next to --out)")
    args = parser.parse_args()
    record = args.out.with_suffix(".json")
    saved = json.loads(record.read_text()) if record.exists() else {}
    curves: dict[str, list[float]] = {name: entry.pop("curve") for name, entry in saved.items() if "curve" in entry}
    summary: dict[str, dict] = {name: entry for name, entry in saved.items() if name in curves}
    if args.window:
        OPTIONS["pipedream-2bw"] = {"window": args.window}
        UPDATES_PER_BATCH["pipedream-2bw"] = N_MICROBATCHES / args.window
    rates = {**LEARNING_RATES, **{k: float(v) for k, v in (item.split("=") for item in args.lr)}}
    for schedule in args.only:
        lr = rates[schedule]
        updates = round(args.batches * UPDATES_PER_BATCH[schedule])
        per_rank = conveyor.launch(_worker, N_STAGES, args=(schedule, args.batches, lr, OPTIONS.get(schedule, {}),
                                                            updates), timeout=1800)
        last = per_rank[-1]
        per_batch = last["losses"] if schedule == "1f1b" else _per_batch(last["losses"], N_MICROBATCHES)
        curves[schedule] = per_batch
        versions = {stage: v for result in per_rank for stage, v in result["versions"].items()}
        summary[schedule] = {"final_train": sum(per_batch[-10:]) / 10, "val": last["val"],
                             "seconds": last["seconds"], "lr": lr, "options": OPTIONS.get(schedule, {}),
                             "peak_versions": versions}
        print(schedule, json.dumps(summary[schedule]), flush=True)
    if "1f1b" in summary:
        for entry in summary.values():
            entry["val_vs_1f1b"] = entry["val"] / summary["1f1b"]["val"]
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4))
    axes = figure.add_subplot()
    for schedule, curve in sorted(curves.items()):
        axes.plot(range(1, len(curve) + 1), curve, label=f"{schedule} (val {summary[schedule]['val']:.3f})",
                  linewidth=1)
    axes.set_xlabel(f"batches of {BATCH} sequences (same samples, same order)")
    axes.set_ylabel("training loss (mean over the batch)")
    axes.set_title("Demo char transformer, 4 stages: synchronous vs asynchronous")
    axes.legend()
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=120)
    record.write_text(json.dumps({name: {**entry, "curve": curves[name]} for name, entry in summary.items()},
                                 indent=1) + "\n")
    print(f"wrote {args.out} and {record}")


if __name__ == "__main__":
    main()
