"""Measure the link between two local ranks: a ping-pong of a few message sizes over the
runtime's own transport (what a pipeline's messages will cost, headers included)."""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from ..runtime.devices import make_transport
from ..schedule.links import ACTIVATION, GRADIENT, Message
from .profile import Link

__all__ = ["measure_link"]

SIZES = (4 << 10, 1 << 20, 8 << 20)
_DONE = "conveyor-link-measured"


def _busy_until_told(rank: int) -> None:
    """Keep a core busy (as a computing stage would) until rank 0 says the ping-pong is over."""
    store = dist.distributed_c10d._get_default_store()
    a = torch.randn(128, 128)
    while not store.check([_DONE]):
        for _ in range(20):
            a = torch.tanh(a @ a)


def _ping_pong(rank: int, world_size: int, sizes: tuple[int, ...], repeats: int) -> tuple[dict[int, float], str]:
    """Median one-way seconds per size (half a round trip) over the transport a pipeline would use
    (sockets on one host), seen from rank 0, and that transport's name. Ranks beyond 1 compute
    meanwhile, so that the two ranks exchanging messages share the cores as pipeline ranks do."""
    transport = make_transport("auto", None, torch.device("cpu"))  # collective: every rank makes one
    if rank >= 2:
        _busy_until_told(rank)
        return {}, ""
    one_way: dict[int, float] = {}
    for size in sizes:
        value = torch.zeros(size // 4, dtype=torch.float32)
        times = []
        for repeat in range(repeats + 1):
            ping, pong = Message(ACTIVATION, 0, repeat), Message(GRADIENT, 1, repeat)
            start = time.perf_counter()
            if rank == 0:
                transport.expect({1: [pong]})
                transport.send(1, ping, value)
                transport.receive(pong, 1)
            else:
                transport.expect({0: [ping]})
                transport.send(0, pong, transport.receive(ping, 0))
            transport.finish()
            times.append((time.perf_counter() - start) / 2)
        one_way[size] = statistics.median(times[1:])
    if rank == 0:
        dist.distributed_c10d._get_default_store().set(_DONE, "1")
    return one_way, type(transport).__name__


def measure_link(sizes: tuple[int, ...] = SIZES, repeats: int = 5, timeout: float = 60.0, processes: int = 2) -> Link:
    """Latency (the smallest message's time) and bandwidth (the slope to the largest) between two
    local processes started with :func:`conveyor.launch`; with ``processes > 2`` the others compute
    meanwhile (a message then also waits for its receiver to get a core, as on an oversubscribed
    machine)."""
    from ..launch import launch

    one_way, transport = launch(_ping_pong, max(2, processes), args=(tuple(sizes), repeats), timeout=timeout)[0]
    small, large = min(sizes), max(sizes)
    slope = max((one_way[large] - one_way[small]) / (large - small), 1e-12)
    latency = max(one_way[small] - small * slope, 1e-7)
    busy = max(2, processes) - 2
    return Link(latency_s=latency, bandwidth_bytes_s=1.0 / slope,
                source=f"measured ({transport}, 2 local processes, {busy} computing beside them)")


def _empty_pipeline(rank: int, world_size: int, n_microbatches: int, steps: int) -> float:
    from .. import pipeline
    from ..runtime import PipelineRunner
    from ..testing import SleepStage, sleep_loss

    stages = [SleepStage(0.0, 0.0, 0.0) for _ in range(world_size)]
    runner = PipelineRunner(pipeline(stages), schedule="1f1b", n_microbatches=n_microbatches, loss_fn=sleep_loss)
    x = torch.zeros(n_microbatches, 8)
    spans = []
    for _ in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        runner.step(x, target=x)
        spans.append(time.perf_counter() - start)
    return statistics.median(spans[1:])


def measure_action_overhead(n_ranks: int, n_microbatches: int = 8, steps: int = 5, timeout: float = 60.0) -> float:
    """Seconds the runtime adds to each action on a step's critical path (its own bookkeeping and
    the hand-off to the next rank), from a 1F1B pipeline of stages that do nothing: the step time
    divided by the critical path's length in actions (``m + p - 1`` forwards and as many backwards)."""
    from ..launch import launch

    span = max(launch(_empty_pipeline, max(2, n_ranks), args=(n_microbatches, steps), timeout=timeout))
    return span / (2 * (n_microbatches + max(2, n_ranks) - 1))
