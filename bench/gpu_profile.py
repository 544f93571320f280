"""Where a GPU step's time goes: GPT-2 small (bf16 autocast), 2 stages, 4 micro-batches, 1f1b.

    python bench/gpu_profile.py [--cpu-dry-run]

Prints (and writes to $OUT/gpu_profile.txt) the median step time of: the unsplit model on the
whole batch, the unsplit model accumulating the same 4 micro-batches (the fair baseline for a
pipeline on one GPU), LocalPipeline, and two host-staged processes; then a torch.profiler table
of the local pipeline's and of each process's busiest operators, with the GPU's busy time
against the wall time, so launch-bound, copy-bound and synchronisation-bound steps tell apart.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for entry in (ROOT, ROOT / "src"):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import conveyor  # noqa: E402

from bench.gpu_check import N_MICROBATCHES, Settings, local_step, process_step, timed, unsplit_step  # noqa: E402


def profile_table(step: Any, device: str, label: str) -> str:
    """Top operators of 3 profiled steps, by self CPU time and by self device time."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        began = time.perf_counter()
        for _ in range(3):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = (time.perf_counter() - began) / 3 * 1e3
    events = prof.key_averages()
    out = io.StringIO()
    busy = sum(e.self_device_time_total for e in events) / 3 / 1e3 if device == "cuda" else 0.0
    print(f"--- {label}: wall {wall:.1f} ms per step, device busy {busy:.1f} ms per step", file=out)
    print(events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48), file=out)
    if device == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=10, max_name_column_width=48), file=out)
    return out.getvalue()


def unsplit_rows(settings: Settings) -> tuple[list[str], str]:
    whole, accumulated = unsplit_step("gpt2", settings), unsplit_step("gpt2", settings, accumulate=True)
    rows = [f"unsplit, whole batch: {statistics.median(timed(whole, settings.device, 3, 10)):.2f} ms",
            f"unsplit, {N_MICROBATCHES} micro-batches accumulated: "
            f"{statistics.median(timed(accumulated, settings.device, 3, 10)):.2f} ms"]
    return rows, profile_table(accumulated, settings.device, "unsplit accumulated")


def local_rows(settings: Settings) -> tuple[list[str], str]:
    step = local_step("gpt2", settings)
    rows = [f"local pipeline: {statistics.median(timed(step, settings.device, 3, 10)):.2f} ms"]
    return rows, profile_table(step, settings.device, "local pipeline")


def process_profile(rank: int, world_size: int, settings: Settings) -> tuple[float, str]:
    step = process_step("gpt2", settings, world_size)
    dist.barrier()
    median = statistics.median(timed(step, settings.device, 3, 10))
    dist.barrier()
    return median, profile_table(step, settings.device, f"rank {rank} of 2 host-staged processes")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-dry-run", action="store_true")
    args = parser.parse_args(argv)
    settings = Settings(args.cpu_dry_run, "auto")
    rows, tables = [], []
    for part in (unsplit_rows, local_rows):
        part_rows, table = part(settings)
        rows += part_rows
        tables.append(table)
        print("\n".join(part_rows), flush=True)
    per_rank = conveyor.launch(process_profile, 2, args=(settings,), backend="gloo", timeout=400)
    rows.append(f"2 processes, host-staged: {per_rank[0][0]:.2f} ms")
    tables += [table for _, table in per_rank]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not settings.dry_run else "cpu"
    text = "\n".join([f"device {device}, torch {torch.__version__}", *rows, "", *tables])
    out = Path(os.environ.get("OUT", ".")) / "gpu_profile.txt"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
