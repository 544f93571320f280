"""Split time: one trace alone (one process) against the slowest rank of a 4-rank job, where
rank 0 traces and the others receive the cut (docs/splitting.md, "One trace per job").

    PYTHONPATH=src python scripts/split_time.py
"""

from __future__ import annotations

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


def in_job(rank: int, world_size: int, name: str) -> float:
    """The slowest rank's split time in a fresh job of ``world_size`` processes."""
    torch.set_num_threads(1)
    if world_size == 1:
        return _split(name)
    dist.barrier()
    seconds = torch.tensor([_split(name)])
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return float(seconds)


def main() -> None:
    print("| model | one trace alone (fresh process) | 4-rank job, slowest rank | ratio |\n|---|---|---|---|")
    for name in ("Llama", "T5"):
        alone = conveyor.launch(in_job, 1, args=(name,), threads_per_rank=1)[0]
        job = conveyor.launch(in_job, RANKS, args=(name,), threads_per_rank=1)[0]
        print(f"| {name} | {alone:.2f} s | {job:.2f} s | {job / alone:.2f} |", flush=True)


if __name__ == "__main__":
    main()
