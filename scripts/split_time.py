"""Split time: one trace alone (one process) against the slowest rank of a 4-rank job, where
rank 0 traces and the others receive the cut (docs/splitting.md, "One trace per job").

    PYTHONPATH=src python scripts/split_time.py
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

import conveyor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "helpers"))
import hf_workers as hw  # noqa: E402

RANKS = 4


def _case(name: str) -> tuple:
    ids, _ = hw.prompts()
    if name == "Llama":
        return hw.llama(torch.float32), (ids[:2],), {}
    return hw.t5(torch.float32), (ids[:2],), {"decoder_input_ids": ids[:2, :5]}


def _split(name: str) -> float:
    warnings.simplefilter("ignore")
    model, args, kwargs = _case(name)
    started = time.perf_counter()
    conveyor.pipeline(model, n_stages=RANKS, example_args=args, example_kwargs=kwargs)
    return time.perf_counter() - started


def in_job(rank: int, world_size: int, name: str) -> tuple[float, float]:
    """(this job's slowest rank's split time, rank 0's own) in a fresh job of ``world_size`` processes."""
    torch.set_num_threads(1)
    if world_size == 1:
        seconds = _split(name)
        return seconds, seconds
    dist.barrier()
    own = _split(name)
    seconds = torch.tensor([own])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    first = torch.tensor([own if rank == 0 else 0.0])
    dist.all_reduce(first, op=dist.ReduceOp.MAX)
    return float(seconds), float(first)


def main(repeats: int = 3) -> None:
    print("| model | one trace alone (fresh process), median | 4-rank job, slowest rank, median | ratio | "
          "slowest rank / rank 0 in the same job, median |\n|---|---|---|---|---|")
    for name in ("Llama", "T5"):
        alone, job, overhead = [], [], []
        for _ in range(repeats):  # alternated: the machine is shared and its load drifts
            alone.append(conveyor.launch(in_job, 1, args=(name,), threads_per_rank=1)[0][0])
            slowest, first = conveyor.launch(in_job, RANKS, args=(name,), threads_per_rank=1)[0]
            job.append(slowest)
            overhead.append(slowest / first)
        a, j, o = statistics.median(alone), statistics.median(job), statistics.median(overhead)
        print(f"| {name} | {a:.2f} s | {j:.2f} s | {j / a:.2f} | {o:.3f} |", flush=True)


if __name__ == "__main__":
    main()
