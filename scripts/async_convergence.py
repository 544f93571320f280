"""Convergence of the asynchronous schedules on the demo's character model (docs/async.md).

Trains the demo's 4-block character transformer on *Coriolanus* with 4 stages on 4 processes,
over the same stream of batches (the same samples in the same order) with ``1f1b``,
``pipedream`` and ``pipedream-2bw``, and writes the loss curves and final numbers.

    python scripts/async_convergence.py [--batches 250] [--out docs/figures/async_convergence.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import conveyor
from conveyor.demo.charlm import CharDataset, char_transformer, lm_loss, load_text

N_STAGES = 4
N_MICROBATCHES = 8
BATCH = 32
SEQ_LEN = 64
# 1F1B and 2BW update on the mean gradient of 32 sequences (2BW one window late); PipeDream after every
# micro-batch of 4. The same AdamW learning rate for all: at 3e-3, without warm-up or clipping, 1F1B
# spikes early and the one-window-stale 2BW does not recover within 250 batches (val 2.76-3.19).
LEARNING_RATES = {"1f1b": 1e-3, "pipedream-2bw": 1e-3, "pipedream": 1e-3}
OPTIONS = {"pipedream-2bw": {"window": N_MICROBATCHES}}


def _batches(n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    train_set = CharDataset(load_text(), "train")
    generator = torch.Generator().manual_seed(0)
    return [train_set.batch(BATCH, SEQ_LEN, generator) for _ in range(n_batches)]


def _worker(rank: int, world_size: int, schedule: str, n_batches: int, lr: float) -> dict:
    train_set, val_set = CharDataset(load_text(), "train"), CharDataset(load_text(), "val")
    torch.manual_seed(0)
    model = char_transformer(train_set.vocab_size, width=128, depth=4, heads=4, seq_len=SEQ_LEN)
    runner = conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=world_size), schedule=schedule,
                                     n_microbatches=N_MICROBATCHES, loss_fn=lm_loss, **OPTIONS.get(schedule, {}))
    optimizer = torch.optim.AdamW(runner.parameters(), lr=lr)
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
    parser.add_argument("--only", nargs="+", default=list(LEARNING_RATES), help="rerun only these schedules "
                        "(the others are read back from the JSON next to --out)")
    args = parser.parse_args()
    record = args.out.with_suffix(".json")
    saved = json.loads(record.read_text()) if record.exists() else {}
    curves: dict[str, list[float]] = {name: entry.pop("curve") for name, entry in saved.items() if "curve" in entry}
    summary: dict[str, dict] = {name: entry for name, entry in saved.items() if name in curves}
    for schedule in args.only:
        lr = LEARNING_RATES[schedule]
        per_rank = conveyor.launch(_worker, N_STAGES, args=(schedule, args.batches, lr), timeout=1800)
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
