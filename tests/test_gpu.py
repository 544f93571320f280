"""The CUDA paths: skipped (with the reason shown) where no GPU is visible; conftest.py hides GPUs
unless CONVEYOR_TEST_CUDA=1. bench/gpu_check.py runs the same checks plus timings on a GPU."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.runtime.staged import CudaStager

import workers
from models import batch32, mlp32, mse

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU, shown to the tests with CONVEYOR_TEST_CUDA=1 pytest tests/test_gpu.py")
ATOL, RTOL = 1e-5, 1e-4


def _reference(device: str) -> dict[str, torch.Tensor]:
    model = mlp32().to(device)
    x, y = (t.to(device) for t in batch32())
    mse(model(x), y).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_local_pipeline_on_one_gpu_equals_the_unsplit_model(schedule: str) -> None:
    pipeline = conveyor.LocalPipeline(conveyor.pipeline(mlp32(), n_stages=4), schedule=schedule, n_microbatches=4,
                                      loss_fn=mse, devices="cuda")
    x, y = batch32()
    pipeline.step(x, target=y)
    reference = _reference("cuda")
    for name, parameter in pipeline.named_parameters():
        assert parameter.device.type == "cuda"
        assert torch.allclose(parameter.grad, reference[name], atol=ATOL, rtol=RTOL), name


def test_cuda_stager_round_trip_keeps_values_and_flags() -> None:
    stager = CudaStager(torch.device("cuda", 0))
    value = torch.randn(64, 64, device="cuda", requires_grad=True)
    host, event = stager.to_host([value.detach()])
    stager.wait(event)
    assert host[0].is_pinned() and torch.equal(host[0], value.detach().cpu())
    back = stager.to_device(host)
    assert back[0].device.type == "cuda" and torch.equal(back[0], value.detach())


def test_two_processes_share_one_gpu_through_host_staging() -> None:
    per_rank = conveyor.launch(workers.gpu_host_staged, 2, backend="gloo", timeout=180)
    assert [r["transport"] for r in per_rank] == ["HostStagedTransport"] * 2
    reference = {n: g.cpu() for n, g in _reference("cuda").items()}
    merged = {**per_rank[0]["grads"], **per_rank[1]["grads"]}
    assert merged.keys() == reference.keys()
    for name, grad in merged.items():
        assert torch.allclose(grad, reference[name], atol=ATOL, rtol=RTOL), name
