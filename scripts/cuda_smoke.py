"""CUDA smoke check for one GPU: stages on cuda in one process (several stages per rank, local
hand-offs) and under conveyor.launch with NCCL on one rank; gradients against the unsplit model."""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn as nn

import conveyor

ATOL, RTOL = 1e-5, 1e-4


def model(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[layer for _ in range(4) for layer in (nn.Linear(64, 64), nn.GELU())])


def data(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(32, 64, generator=generator).to(device), torch.randn(32, 64, generator=generator).to(device)


def check(schedule: str, n_stages: int, recompute: bool, device: str = "cuda") -> str:
    reference = model().to(device)
    x, y = data(device)
    nn.functional.mse_loss(reference(x), y).backward()
    pipe = conveyor.pipeline(model(), n_stages=n_stages)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=4, loss_fn=nn.functional.mse_loss,
                                     device=device, recompute=recompute)
    runner.step(x, target=y)
    worst = max((p.grad - dict(reference.named_parameters())[n].grad).abs().max().item()
                for n, p in runner.named_parameters())
    ok = all(torch.allclose(p.grad, dict(reference.named_parameters())[n].grad, atol=ATOL, rtol=RTOL)
             for n, p in runner.named_parameters())
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(20):
        runner.step(x, target=y)
    torch.cuda.synchronize()
    per_step = (time.perf_counter() - start) / 20 * 1e3
    device_name = next(runner.parameters()).device
    return (f"{schedule:18s} stages={n_stages} recompute={recompute!s:5s} on {device_name}: "
            f"max |grad diff| {worst:.2e} {'OK' if ok else 'MISMATCH'}, {per_step:.2f} ms/step")


def one_rank_nccl(rank: int, world_size: int) -> str:
    return f"backend {dist.get_backend()}: " + check("zb-v", 2, False)


if __name__ == "__main__":
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    for schedule, stages in [("gpipe", 1), ("1f1b", 1), ("interleaved-1f1b", 2), ("interleaved-1f1b", 4),
                             ("zb-v", 2)]:
        for recompute in (False, True):
            print(check(schedule, stages, recompute))
    dist.destroy_process_group()
    print(conveyor.launch(one_rank_nccl, 1, timeout=120)[0])
