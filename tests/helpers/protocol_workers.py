"""Rank functions for the NCCL-protocol rehearsal: the runner's direct transport runs NCCL's
message protocol (headers on the stages' device, one receive posted per link, one tag, a second
group for messages to lower ranks) over gloo with CPU tensors."""

from __future__ import annotations

import functools

import torch

import conveyor
from conveyor.runtime.comm import DirectTransport

from models import DTYPE, WIDTH, mlp, mse

# rows per step: the middle step's micro-batch values (100 rows x 6 float64 = 4.8 KB) outgrow the
# 4 KiB starting capacity, so their data follows the header as a second transfer on the same tag
ROWS_PER_STEP = [16, 400, 16]
N_MICROBATCHES = 4


def batch_of(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(300 + step)
    rows = ROWS_PER_STEP[step]
    return (torch.randn(rows, WIDTH, dtype=DTYPE, generator=generator),
            torch.randn(rows, WIDTH, dtype=DTYPE, generator=generator))


def reference() -> list[dict[str, torch.Tensor]]:
    """Each step's gradients of the unsplit MLP trained with Adam on the whole batch."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    grads = []
    for step in range(len(ROWS_PER_STEP)):
        optimizer.zero_grad()
        x, y = batch_of(step)
        mse(model(x), y).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
        optimizer.step()
    return grads


def schedules_over_nccl_protocol(rank: int, world_size: int, schedules: list[str]) -> dict:
    """Per schedule: this rank's gradients at every step and what its transport ran. The runners
    follow one another in one job, each closed before the next: a later transport must reuse the
    downward group (one destroyed and created again met its predecessor's store keys and failed
    to connect)."""
    results: dict = {}
    for schedule in schedules:
        n_stages = 2 * world_size if schedule in ("interleaved-1f1b", "zb-v") else world_size
        runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=n_stages), schedule=schedule,
                                         n_microbatches=N_MICROBATCHES, loss_fn=mse, device="cpu",
                                         transport=functools.partial(DirectTransport, protocol="nccl"))
        transport = runner.transport
        optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
        grads = []
        for step in range(len(ROWS_PER_STEP)):
            optimizer.zero_grad()
            x, y = batch_of(step)
            runner.step(x, target=y)
            grads.append({name: p.grad.clone() for name, p in runner.named_parameters()})
            optimizer.step()
        results[schedule] = {
            "grads": grads, "protocol": transport.protocol, "lag": transport.lag, "data_tag": transport.data_tag,
            "second_group": transport.link_pg(1, 0) is not transport.link_pg(0, 1),
            "transfers": transport.transfers}
        runner.close()
    return results
