"""Faults end the whole job quickly and say where they happened; nothing is left running."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

import conveyor

import workers


def test_nan_is_caught_at_the_stage_and_microbatch_with_detect_anomaly() -> None:
    with pytest.raises(conveyor.LaunchError, match=r"^rank 1 failed") as caught:
        conveyor.launch(workers.nan_in_stage, 2, args=(True,), timeout=60)
    assert "rank 1, stage 1, micro-batch 0, action 1F0: FloatingPointError: the loss contains NaN" in str(caught.value)


def test_nan_passes_silently_without_detect_anomaly() -> None:
    assert conveyor.launch(workers.nan_in_stage, 2, args=(False,), timeout=60) == [None, None]


def test_a_rank_killed_mid_step_ends_the_job_naming_rank_and_signal(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError, match=r"^rank 2 failed") as caught:
        conveyor.launch(workers.kill_mid_step, 4, args=(str(tmp_path),), timeout=60)
    assert time.monotonic() - start < 30
    assert "rank 2 was killed by signal SIGKILL" in str(caught.value)
    pids = [int(path.read_text()) for path in tmp_path.glob("*.pid")]
    assert len(pids) == 4
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_peer_that_stops_answering_times_out_instead_of_hanging() -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError) as caught:
        conveyor.launch(workers.stop_answering, 2, timeout=60, pg_timeout=3)
    assert time.monotonic() - start < 30
    assert "from rank 1 failed" in str(caught.value)
