"""The same script runs under torchrun (2 nodes x 2 processes on loopback) via conveyor.run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import conveyor

import workers

HERE = Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_nodes_gives_the_gradients_of_launch(tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             str(HERE / "helpers" / "torchrun_script.py"), str(tmp_path)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in range(2)
    ]
    for node in nodes:
        try:
            output, _ = node.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            raise
        assert node.returncode == 0, output
    from_torchrun: dict = {}
    for rank in range(4):
        from_torchrun.update(torch.load(tmp_path / f"grads-{rank}.pt"))
    from_launch: dict = {}
    for grads in conveyor.launch(workers.torchrun_grads, 4, timeout=60):
        from_launch.update(grads)
    assert from_torchrun.keys() == from_launch.keys() and len(from_launch) == 8
    for name in from_launch:
        assert torch.equal(from_torchrun[name], from_launch[name]), name
