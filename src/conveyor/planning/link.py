"""Measure the link between two local ranks: a gloo ping-pong of a few message sizes."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from .profile import Link

__all__ = ["measure_link"]

SIZES = (4 << 10, 1 << 20, 8 << 20)


def _ping_pong(rank: int, world_size: int, sizes: tuple[int, ...], repeats: int) -> dict[int, float]:
    """Median one-way seconds per size (half a round trip), seen from rank 0."""
    one_way: dict[int, float] = {}
    for size in sizes:
        buffer = torch.zeros(size // 4, dtype=torch.float32)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            if rank == 0:
                dist.send(buffer, 1)
                dist.recv(buffer, 1)
            else:
                dist.recv(buffer, 0)
                dist.send(buffer, 0)
            times.append((time.perf_counter() - start) / 2)
        one_way[size] = statistics.median(times[1:])
    return one_way


def measure_link(sizes: tuple[int, ...] = SIZES, repeats: int = 5, timeout: float = 60.0) -> Link:
    """Latency (the smallest message's time) and bandwidth (the slope to the largest) between two
    local processes started with :func:`conveyor.launch`."""
    from ..launch import launch

    one_way = launch(_ping_pong, 2, args=(tuple(sizes), repeats), timeout=timeout)[0]
    small, large = min(sizes), max(sizes)
    slope = max((one_way[large] - one_way[small]) / (large - small), 1e-12)
    latency = max(one_way[small] - small * slope, 1e-7)
    return Link(latency_s=latency, bandwidth_bytes_s=1.0 / slope, source="measured (gloo, 2 local processes)")
