"""conveyor.launch: results come back whole, failures and deaths are named, nothing outlives it."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.distributed as dist

import conveyor


def _rank_tensor(rank: int, world_size: int, size: int) -> dict:
    tensor = torch.full((size,), float(rank))
    dist.all_reduce(tensor)
    return {"rank": rank, "world": world_size, "sum": tensor, "pid": os.getpid()}


def _raise_on_rank_one(rank: int, world_size: int) -> None:
    if rank == 1:
        raise KeyError("missing thing on rank one")
    time.sleep(60)


def _die_on_rank_zero(rank: int, world_size: int) -> None:
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(60)


def test_results_come_back_per_rank_with_tensors_intact() -> None:
    results = conveyor.launch(_rank_tensor, 3, args=(1000,), timeout=60)
    assert [r["rank"] for r in results] == [0, 1, 2]
    assert all(r["world"] == 3 for r in results)
    assert all(torch.equal(r["sum"], torch.full((1000,), 3.0)) for r in results)


def test_an_exception_names_the_rank_with_its_traceback() -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError, match=r"^rank 1 failed") as caught:
        conveyor.launch(_raise_on_rank_one, 3, timeout=60)
    assert "KeyError: 'missing thing on rank one'" in str(caught.value)
    assert time.monotonic() - start < 20


def test_a_killed_rank_is_named_with_its_signal() -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError, match=r"rank 0 was killed by signal SIGKILL"):
        conveyor.launch(_die_on_rank_zero, 2, timeout=60)
    assert time.monotonic() - start < 20


def test_timeout_names_the_ranks_still_running_and_stops_them() -> None:
    with pytest.raises(conveyor.LaunchError, match=r"timed out after 2 s; ranks \[0, 1\] were still running"):
        conveyor.launch(_sleep, 2, timeout=2)


def test_run_outside_torchrun_explains_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(conveyor.LaunchError, match=r"needs torchrun's environment"):
        conveyor.run(_sleep)
