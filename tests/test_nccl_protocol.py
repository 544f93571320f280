"""NCCL's message protocol, rehearsed over gloo with CPU tensors (``DirectTransport(...,
protocol="nccl")``): every synchronous schedule trains exactly like the unsplit model, so what a
CPU machine cannot exercise of the NCCL path is NCCL itself."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.runtime.comm import _protocol

import protocol_workers

ATOL = 1e-10
SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"]


@pytest.fixture(scope="module")
def rehearsed() -> list[dict]:
    return conveyor.launch(protocol_workers.schedules_over_nccl_protocol, 2, args=(SCHEDULES,), timeout=240)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_gradients_over_the_nccl_protocol_equal_the_unsplit_models(rehearsed: list[dict], schedule: str) -> None:
    expected = protocol_workers.reference()
    for step, want in enumerate(expected):
        got: dict[str, torch.Tensor] = {}
        for per_rank in rehearsed:
            got.update(per_rank[schedule]["grads"][step])
        assert sorted(got) == sorted(want)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=ATOL, rtol=0,
                                       msg=f"{schedule}, step {step}, {name}")


def test_the_rehearsal_runs_nccls_protocol_not_gloos(rehearsed: list[dict]) -> None:
    for per_rank in rehearsed:
        for schedule in SCHEDULES:
            ran = per_rank[schedule]
            assert ran["protocol"] == "nccl"
            assert ran["lag"] == 1  # one receive posted per link
            assert ran["data_tag"] == 0  # large data follows its header on the same tag, in order
            assert ran["second_group"]  # messages to lower ranks travel on their own group


def test_a_gloo_group_runs_gloos_protocol_unless_nccls_is_asked_for() -> None:
    assert _protocol(None, "gloo", torch.device("cpu")) == "gloo"
    assert _protocol("nccl", "gloo", torch.device("cpu")) == "nccl"
    assert _protocol(None, "nccl", torch.device("cuda")) == "nccl"


def test_the_rehearsal_needs_cpu_stages() -> None:
    with pytest.raises(ValueError, match="use device='cpu' or an NCCL group"):
        _protocol("nccl", "gloo", torch.device("cuda"))


def test_an_unknown_protocol_is_refused_naming_the_choices() -> None:
    with pytest.raises(ValueError, match="not one of"):
        _protocol("ucx", "gloo", torch.device("cpu"))
    with pytest.raises(ValueError, match="cannot run the 'gloo' message protocol"):
        _protocol("gloo", "nccl", torch.device("cuda"))
