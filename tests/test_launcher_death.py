"""No rank outlives its launcher: SIGKILL or SIGTERM to the process that called conveyor.launch
ends every rank and helper process (fork server, resource tracker) within 3 s, mid-step. A rank
that leaves the job early is the one named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import conveyor

from models import batch, mlp, mse

HERE = Path(__file__).parent
DEADLINE_S = 3.0


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            tree.setdefault(parent, []).append(int(entry.name))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by whoever adopted it, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_killing_the_launcher_ends_every_rank_and_helper_within_3_s(tmp_path: Path, signal_name: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen([sys.executable, str(HERE / "helpers" / "launcher_script.py"), str(tmp_path)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while not all((tmp_path / f"rank-{rank}.steps").exists() for rank in range(2)):  # mid-training
            assert launcher.poll() is None, launcher.communicate()[0].decode()[-3000:]
            assert time.monotonic() < deadline, "the ranks did not start training"
            time.sleep(0.1)
        ranks = {int((tmp_path / f"rank-{rank}.pid").read_text()) for rank in range(2)}
        job = _descendants(launcher.pid)
        assert ranks <= job and len(job) >= 3  # the ranks and at least one helper (fork server / tracker)
        killed_at = time.monotonic()
        launcher.send_signal(getattr(signal, signal_name))
        while any(_alive(pid) for pid in job) and time.monotonic() - killed_at < 10:
            time.sleep(0.02)
        seconds = time.monotonic() - killed_at
        left = sorted(pid for pid in job if _alive(pid))
        print(f"{signal_name}: every process of the job gone {seconds:.2f} s after the signal")
        assert not left, f"{left} still running {seconds:.1f} s after {signal_name} to the launcher"
        assert seconds < DEADLINE_S
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait(10)
        for pid in job if "job" in locals() else ():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _return_after_one_step(rank: int, world_size: int) -> None:
    """Rank 1 returns after one step; rank 0 goes on to a second step, waiting for it."""
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=4, loss_fn=mse)
    x, y = batch(0)
    runner.step(x, target=y)
    if rank == 1:
        return
    runner.step(x, target=y)


def test_a_rank_that_returns_early_is_named_as_the_one_that_left() -> None:
    start = time.monotonic()
    with pytest.raises(conveyor.LaunchError, match=r"^rank 1 returned while the other ranks still") as caught:
        conveyor.launch(_return_after_one_step, 2, timeout=60, pg_timeout=20)
    assert caught.value.rank == 1
    assert "rank 0 then failed" in str(caught.value)
    assert time.monotonic() - start < 30
