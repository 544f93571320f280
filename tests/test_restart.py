"""Automatic restart: under torchrun --max-restarts=1 (two agents, "nodes", on loopback), a rank
SIGKILLed mid-training restarts the job, which resumes from the newest complete checkpoint by
itself and ends with the weights of an uninterrupted run, bit for bit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import conveyor

HERE = Path(__file__).parent
TRAIN = ["-m", "conveyor.cli", "train", str(HERE / "helpers" / "restart_workload.py"), "--stages", "2",
         "--microbatches", "2", "--batch-size", "8", "--steps", "4", "--checkpoint-every", "2"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    source = str(Path(conveyor.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": source, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", **extra}


def _finish(processes: list[subprocess.Popen], timeout: float) -> list[str]:
    outputs = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            output, _ = process.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for other in processes:  # each in a session of its own: end the agents with their workers
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(other.pid, signal.SIGKILL)
            seen = [other.communicate()[0][-3000:] for other in processes]
            raise AssertionError(f"torchrun did not finish within {timeout:g} s:\n" + "\n----\n".join(seen)) from None
        outputs.append(output)
        assert process.returncode == 0, output[-4000:]
    return outputs


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="loopback torchrun agents")
def test_a_rank_killed_mid_training_restarts_and_resumes_bit_identically(tmp_path: Path) -> None:
    straight = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *TRAIN,
         "--checkpoint-dir", str(tmp_path / "straight")],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _finish([straight], 180)

    start = time.monotonic()
    port, marker = _free_port(), tmp_path / "killed"
    # a fresh store for every round of workers: in torchrun's shared agent store, a restarted round
    # can read the addresses the previous round's ranks left there (docs/checkpoints.md)
    env = _env(CONVEYOR_TEST_KILL_MARKER=str(marker), CONVEYOR_TEST_KILL_AT="3", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--max-restarts", "1", "--monitor-interval", "0.2", "--rdzv-backend", "c10d",
             "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "restart-test",
             "--rdzv-conf", f"is_host={1 if node == 0 else 0}", *TRAIN,
             "--checkpoint-dir", str(tmp_path / "restarted")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        for node in range(2)
    ]
    outputs = _finish(agents, 240)
    seconds = time.monotonic() - start
    print(f"restart test: two agents, one kill, one restart: {seconds:.1f} s")
    assert marker.read_text() == "killed at step 3"
    assert any("restart 1: resuming from" in output and "step-000002 (step 2)" in output for output in outputs), \
        outputs[0][-3000:]
    expected = conveyor.load_full(tmp_path / "straight" / "step-000004")
    restarted = conveyor.load_full(tmp_path / "restarted" / "step-000004")
    assert expected.keys() == restarted.keys()
    assert all(torch.equal(expected[name], restarted[name]) for name in expected)
