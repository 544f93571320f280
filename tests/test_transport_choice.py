"""Transport choice and the host-staged transport, exercised on CPU: the staging step is a copy
(``CpuStager``), optionally reported late so sends are deferred and posted in order."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import conveyor
from conveyor.runtime.devices import choose_transport

import workers
from models import batch, mlp, mse

ATOL = 1e-10
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.mark.parametrize(("backend", "device", "chosen"), [
    ("nccl", GPU, "direct"), ("gloo", GPU, "host-staged"), ("gloo", CPU, "sockets")])
def test_auto_picks_nccl_direct_host_staging_for_cuda_over_gloo_and_sockets_for_cpu(backend: str, device: torch.device,
                                                                    chosen: str) -> None:
    assert choose_transport("auto", backend, device) == chosen


@pytest.mark.parametrize(("requested", "backend", "device", "message"), [
    ("direct", "gloo", GPU, "gloo cannot send CUDA tensors"),
    ("host-staged", "nccl", GPU, "launch with backend='gloo'"),
    ("direct", "nccl", CPU, "NCCL group carries only CUDA tensors"),
    ("sockets", "gloo", GPU, "carries CPU tensors"),
    ("fast", "gloo", CPU, "is not one of")])
def test_impossible_transports_are_rejected_with_the_fix(requested: str, backend: str, device: torch.device,
                                                         message: str) -> None:
    with pytest.raises(ValueError, match=message):
        choose_transport(requested, backend, device)


def test_host_staging_can_be_forced_on_cpu() -> None:
    assert choose_transport("host-staged", "gloo", CPU) == "host-staged"


def _reference() -> dict[int, dict[str, torch.Tensor]]:
    grads = {}
    for step in range(2):
        model = mlp()
        x, y = batch(step)
        mse(model(x), y).backward()
        grads[step] = {n: p.grad for n, p in model.named_parameters()}
    return grads


def _merged(per_rank: list[dict]) -> dict[int, dict[str, torch.Tensor]]:
    merged: dict[int, dict[str, torch.Tensor]] = {0: {}, 1: {}}
    for result in per_rank:
        for step, grads in result["grads"].items():
            merged[step].update(grads)
    return merged


def _assert_equal_to_reference(per_rank: list[dict]) -> None:
    reference, ours = _reference(), _merged(per_rank)
    for step in (0, 1):
        assert ours[step].keys() == reference[step].keys()
        assert max((ours[step][n] - reference[step][n]).abs().max().item() for n in reference[step]) < ATOL


@pytest.mark.parametrize(("schedule", "n_ranks"), [("1f1b", 4), ("zb-h1", 2), ("zb-v", 2)])
def test_host_staged_gradients_equal_the_unsplit_model(schedule: str, n_ranks: int) -> None:
    per_rank = conveyor.launch(workers.host_staged, n_ranks, args=(schedule, 0, ["host-staged"] * n_ranks),
                               timeout=120)
    assert all(result["staged"] and result["copies"] > 0 for result in per_rank)
    _assert_equal_to_reference(per_rank)


def test_late_staging_copies_defer_sends_without_reordering_or_deadlock() -> None:
    per_rank = conveyor.launch(workers.host_staged, 4, args=("1f1b", 3, ["host-staged"] * 4), timeout=120)
    assert all(result["deferred"] > 0 for result in per_rank)
    _assert_equal_to_reference(per_rank)


def test_a_host_staged_rank_talks_to_a_direct_rank() -> None:
    per_rank = conveyor.launch(workers.host_staged, 2, args=("1f1b", 1, ["host-staged", "direct"]), timeout=120)
    assert [result["staged"] for result in per_rank] == [True, False]
    _assert_equal_to_reference(per_rank)


def test_an_auto_cpu_rank_beside_a_host_staged_rank_uses_gloo_not_sockets() -> None:
    per_rank = conveyor.launch(workers.host_staged, 2, args=("1f1b", 1, ["host-staged", "auto"]), timeout=120)
    assert [result["transport"] for result in per_rank] == ["HostStagedTransport", "DirectTransport"]
    _assert_equal_to_reference(per_rank)


def test_auto_cpu_ranks_on_one_host_use_sockets() -> None:
    per_rank = conveyor.launch(workers.host_staged, 2, args=("1f1b", 0, ["auto", "auto"]), timeout=120)
    assert [result["transport"] for result in per_rank] == ["SocketTransport"] * 2
    _assert_equal_to_reference(per_rank)


def test_without_the_socket_transports_platform_constants_conveyor_imports_and_auto_picks_gloo() -> None:
    # as on Windows: no socket.MSG_DONTWAIT, no select.POLLIN (nor poll)
    script = (
        "import select, socket, sys\n"
        "del socket.MSG_DONTWAIT, select.POLLIN, select.poll\n"
        "import torch, conveyor\n"
        "from conveyor.runtime.devices import choose_transport\n"
        "assert 'conveyor.runtime.sockets' not in sys.modules\n"
        "print(choose_transport('auto', 'gloo', torch.device('cpu')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["direct"]


def test_asking_for_sockets_where_the_platform_lacks_them_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delattr(socket, "MSG_DONTWAIT", raising=False)
    with pytest.raises(ValueError, match="this platform lacks: use 'auto' or 'direct'"):
        choose_transport("sockets", "gloo", CPU)
