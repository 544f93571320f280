"""Faults end the whole job quickly and say where they happened; nothing is left running."""

from __future__ import annotations

import os
import re
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


# --- the watchdog: every rank knows what every other rank was asked to do ------------------------
def _failure(fn: object, *args: object, **launch_options: object) -> tuple[str, float]:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError) as caught:
        conveyor.launch(fn, 2, args=args, timeout=90, **launch_options)
    return str(caught.value), time.monotonic() - start


@pytest.mark.parametrize("transport", ["sockets", "direct"])
def test_step_on_one_rank_and_forward_on_another_is_named_within_seconds(transport: str, tmp_path: Path) -> None:
    mark = tmp_path / "mark"
    text, _ = _failure(workers.step_against_forward, transport, str(mark))
    reported_after = time.monotonic() - float(mark.read_text())
    assert ("the ranks made different calls: rank 0 called step() (call 3, 8 micro-batches), "
            "rank 1 called forward() (call 3, 8 micro-batches)") in text
    assert reported_after < 10


def test_without_a_job_store_the_runners_rank_0_serves_the_watchdog(tmp_path: Path) -> None:
    text, _ = _failure(workers.step_against_forward, "sockets", None, False)
    assert ("the ranks made different calls: rank 0 called step() (call 3, 8 micro-batches), "
            "rank 1 called forward() (call 3, 8 micro-batches)") in text


@pytest.mark.parametrize("transport", ["sockets", "direct"])
def test_a_rank_that_returns_a_step_early_is_named_as_the_one_that_left(transport: str) -> None:
    text, seconds = _failure(workers.leave_early, transport, "return")
    assert "rank 1 left the job after call 4; rank 0 is waiting for it in call 5 (step(), 8 micro-batches)" in text
    assert "connection" not in text.splitlines()[-1]
    assert seconds < 30


@pytest.mark.parametrize("transport", ["sockets", "direct"])
def test_a_rank_that_closes_its_runner_and_stays_alive_is_named_as_the_one_that_left(transport: str) -> None:
    text, seconds = _failure(workers.leave_early, transport, "close")
    assert "rank 1 left the job after call 4; rank 0 is waiting for it in call 5 (step(), 8 micro-batches)" in text
    assert seconds < 30


def test_a_rank_that_skips_a_step_and_stays_alive_is_named_after_the_stall_timeout() -> None:
    text, seconds = _failure(workers.skip_last_step, "auto", 3.0)
    assert re.search(r"the ranks made different calls: rank 0 called step\(\) \(call 5, 8 micro-batches\), "
                     r"rank 1 has made no call 5 \(its last: step\(\) \(call 4, 8 micro-batches\)\), idle for \d+ s",
                     text), text
    assert seconds < 40


@pytest.mark.parametrize("transport", ["sockets", "direct"])
def test_a_rank_stuck_in_its_forward_is_named_after_the_stall_timeout(transport: str) -> None:
    text, seconds = _failure(workers.stuck_in_forward, transport, 2.0)
    assert re.search(r"StallError: rank 0: rank 1 \(stage 1\) has been in action 1F\d for [23] s "
                     r"\(stall_timeout 2 s\); rank 0 is waiting for it in call 2 \(step\(\), 8 micro-batches\)",
                     text), text
    assert seconds < 40


def test_actions_that_each_finish_within_the_stall_timeout_are_never_stopped() -> None:
    # every forward of rank 1 takes 1 s of a 2 s limit; rank 0 waits 4 s for its first gradient
    losses = conveyor.launch(workers.slow_actions, 2, args=("auto", 1.0, 2.0), timeout=90)
    reference = conveyor.launch(workers.slow_actions, 2, args=("auto", 0.0, 60.0), timeout=90)
    assert losses[0] is None and losses[1] == reference[1]


def test_runners_built_with_different_microbatch_counts_are_refused_naming_each_rank() -> None:
    text, _ = _failure(workers.different_microbatch_counts)
    assert ("the ranks built different PipelineRunners (n_microbatches: rank 0 8, rank 1 4): every rank must "
            "construct the runner with the same arguments") in text


def test_a_hundred_closed_runners_leave_no_watchdog_thread_store_or_socket_behind() -> None:
    for threads_before, files_before, threads_after, files_after in conveyor.launch(
            workers.runners_in_a_loop, 2, args=(100,), timeout=240):
        assert threads_after == threads_before
        assert files_after <= files_before + 2
