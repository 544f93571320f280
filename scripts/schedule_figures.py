"""Regenerate docs/schedules.md's pictures and table: each schedule on 4 ranks, 8 micro-batches,
run on sleeping stages (forward 10 ms, input-grad 10 ms, weight-grad 10 ms per stage; halved per
virtual stage where a rank holds two), against the simulator with the same costs."""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import torch

from conveyor.schedule import simulate
from conveyor.timeline import measured_bubble, render, sleep_costs, sleep_pipeline_trace

RANKS, MICROBATCHES = 4, 8
SCHEDULES = [("gpipe", 4), ("1f1b", 4), ("interleaved-1f1b", 8), ("zb-h1", 4), ("zb-v", 8)]


def main(out: Path) -> None:
    figures = out / "figures"
    rows = []
    for name, n_stages in SCHEDULES:
        per_stage = 0.010 * RANKS / n_stages
        seconds = (per_stage, per_stage, per_stage)
        predicted = simulate(name, n_stages, MICROBATCHES, sleep_costs(n_stages, seconds), n_ranks=RANKS)
        events = sleep_pipeline_trace(name, RANKS, n_stages, MICROBATCHES, seconds, steps=4)
        step = max(e.end for e in events) - min(e.start - e.waited for e in events)
        bubble = measured_bubble(events, RANKS)
        render(events, figures / f"{name}.png", title=f"{name}: {RANKS} ranks, {n_stages} stages, "
                                                     f"{MICROBATCHES} micro-batches (measured)")
        rows.append(f"| {name} | {n_stages} | {predicted.bubble:.3f} | {bubble:.3f} | "
                    f"{predicted.makespan * 1e3:.0f} | {step * 1e3:.0f} | {step / predicted.makespan:.3f} |")
        print(rows[-1], flush=True)
    table = "\n".join([
        "| schedule | stages | simulated bubble | measured bubble | ideal step (ms) | measured step (ms) | ratio |",
        "|---|---|---|---|---|---|---|", *rows])
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, " \
              f"Python {sys.version.split()[0]}"
    print(f"Measured on {machine}.\n\n{table}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
