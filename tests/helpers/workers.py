"""Functions run on every rank by conveyor.launch in the tests; each returns what rank 0's
pipeline (or every rank) saw, for the test process to compare with the unsplit model."""

from __future__ import annotations

import torch
import torch.distributed as dist

import conveyor

from models import batch, batch32, masked_model, mlp, mse

STEPS = 5


def pipeline_groups(world_size: int, n_stages: int) -> dist.ProcessGroup:
    """Split the job into world_size / n_stages pipelines; return this rank's group."""
    mine = None
    for first in range(0, world_size, n_stages):
        group = dist.new_group(list(range(first, first + n_stages)))
        if first <= dist.get_rank() < first + n_stages:
            mine = group
    assert mine is not None
    return mine


def train_matrix(rank: int, world_size: int, schedules: list[str], stage_counts: list[int],
                 microbatch_counts: list[int]) -> dict:
    """For every configuration: gradients of step 1 and weights after STEPS Adam steps."""
    results: dict = {}
    for n_stages in stage_counts:
        group = pipeline_groups(world_size, n_stages)
        for schedule in schedules:
            for n_microbatches in microbatch_counts:
                pipe = conveyor.pipeline(mlp(), n_stages=n_stages)
                runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=n_microbatches,
                                                 loss_fn=mse, group=group)
                optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
                grads, losses = {}, []
                for step in range(STEPS):
                    optimizer.zero_grad()
                    x, y = batch(step)
                    losses.append(runner.step(x, target=y))
                    if step == 0:
                        grads = {name: p.grad.clone() for name, p in runner.named_parameters()}
                    optimizer.step()
                if rank < n_stages:
                    results[(schedule, n_stages, n_microbatches)] = {
                        "grads": grads, "weights": runner.state_dict(), "losses": losses,
                        "peak": runner.peak_stashed,
                    }
    return results


def forward_only(rank: int, world_size: int, schedule: str = "1f1b", n_stages: int = 0) -> torch.Tensor | None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=n_stages or world_size), schedule=schedule,
                                     n_microbatches=4)
    runner.eval()
    return runner.forward(batch(0, rows=10)[0])


def tuple_boundary(rank: int, world_size: int) -> dict:
    """A boundary carrying (hidden, int64 ids, bool mask); sequence length changes every step."""
    runner = conveyor.PipelineRunner(conveyor.pipeline(masked_model()), schedule="1f1b", n_microbatches=2,
                                     loss_fn=mse)
    generator = torch.Generator().manual_seed(0)
    out = {}
    for length in (5, 3, 7):
        for p in runner.parameters():
            p.grad = None
        ids = torch.randint(0, 10, (4, length), generator=generator)
        target = torch.randn(4, 6, dtype=torch.float64, generator=generator)
        loss = runner.step(ids, target=target)
        out[length] = {"loss": loss, "grads": {n: p.grad.clone() for n, p in runner.named_parameters()}}
    return out


def uneven_and_recompute(rank: int, world_size: int) -> dict:
    """Batch 10 into 4 micro-batches; dropout with and without recompute."""
    out = {}
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="gpipe", n_microbatches=4, loss_fn=mse)
    x, y = batch(3, rows=10)
    out["uneven_loss"] = runner.step(x, target=y)
    out["uneven_grads"] = {n: p.grad.clone() for n, p in runner.named_parameters()}
    for recompute in (False, True):
        for schedule in ("gpipe", "1f1b"):
            pipe = conveyor.pipeline(mlp(dropout=0.5), n_stages=world_size)
            runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=4, loss_fn=mse,
                                             recompute=recompute)
            torch.manual_seed(100 + rank)
            x, y = batch(4)
            runner.step(x, target=y)
            out[("dropout", schedule, recompute)] = {n: p.grad.clone() for n, p in runner.named_parameters()}
            out[("peak", schedule, recompute)] = runner.peak_stashed
    return out


def _explode(module: object, args: object, output: object) -> None:
    raise RuntimeError("boom in the user's layer")


def fail_in_forward(rank: int, world_size: int) -> None:
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=4, loss_fn=mse)
    if rank == 1:
        runner.stages[1].module.register_forward_hook(_explode)
    x, y = batch(0)
    runner.step(x, target=y)


def mismatched_stages(rank: int, world_size: int, hidden: int, second_in: int, second_dtype: str) -> None:
    """Stage 0 emits `hidden` float64 features; stage 1 expects `second_in` features of `second_dtype`."""
    import torch.nn as nn

    torch.manual_seed(0)
    stages = [nn.Linear(6, hidden, dtype=torch.float64),
              nn.Linear(second_in, 6, dtype=getattr(torch, second_dtype))]
    runner = conveyor.PipelineRunner(conveyor.pipeline(stages), schedule="gpipe", n_microbatches=2, loss_fn=mse)
    x, y = batch(0, rows=4)
    runner.step(x, target=y)


def hang_after_failure(rank: int, world_size: int) -> None:
    """Rank 2 raises in the middle of a step; the others block waiting for it."""
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=8, loss_fn=mse)
    x, y = batch(0)
    runner.step(x, target=y)
    if rank == 2:
        raise ValueError("rank 2 gives up")
    runner.step(x, target=y)


def torchrun_grads(rank: int, world_size: int) -> dict:
    pipe = conveyor.pipeline(mlp(), n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=4, loss_fn=mse)
    x, y = batch(0)
    runner.step(x, target=y)
    return {n: p.grad.clone() for n, p in runner.named_parameters()}


def tied_training(rank: int, world_size: int, steps: int) -> dict:
    from models import TiedLM, tied_pipe, token_loss

    runner = conveyor.PipelineRunner(tied_pipe(TiedLM()), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.05)
    generator = torch.Generator().manual_seed(0)
    grads = {}
    for step in range(steps):
        ids = torch.randint(0, 11, (4, 5), generator=generator)
        target = torch.randint(0, 11, (4, 5), generator=generator)
        optimizer.zero_grad()
        runner.step(ids, target=target)
        if step == 0:
            grads = {n: p.grad.clone() for n, p in runner.named_parameters()}
        optimizer.step()
    return {"grads": grads, "weights": {n: p.detach().clone() for n, p in runner.named_parameters()},
            "norm": runner.clip_grad_norm_(1e9)}


def tied_clipped(rank: int, world_size: int, max_norm: float) -> torch.Tensor | None:
    """One step of the tied model, clipped: this rank's gradient of embed.weight (ranks 0 and 2 hold it)."""
    from models import TiedLM, tied_pipe, token_loss

    runner = conveyor.PipelineRunner(tied_pipe(TiedLM()), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    generator = torch.Generator().manual_seed(0)
    ids, target = torch.randint(0, 11, (4, 5), generator=generator), torch.randint(0, 11, (4, 5), generator=generator)
    runner.step(ids, target=target)
    runner.clip_grad_norm_(max_norm)
    grads = {name: parameter.grad for name, parameter in runner.named_parameters()}
    return grads["embed.weight"].clone() if "embed.weight" in grads else None


def schedule_matrix(rank: int, world_size: int, configs: list[tuple]) -> dict:
    """configs: (model name, schedule, ranks, stages, micro-batches, recompute); only the ranks a
    configuration needs run it, on a group of the first `ranks` ranks."""
    from models import skip_model

    groups = {n: dist.new_group(list(range(n))) for n in sorted({c[2] for c in configs})}
    results: dict = {}
    for config in configs:
        model_name, schedule, n_ranks, n_stages, n_microbatches, recompute = config
        if rank >= n_ranks:
            continue
        model = mlp(layers=2 * n_stages) if model_name == "mlp" else skip_model(n_stages)
        pipe = conveyor.pipeline(model, n_stages=n_stages) if model_name == "mlp" else conveyor.pipeline(model)
        runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=n_microbatches, loss_fn=mse,
                                         group=groups[n_ranks], recompute=recompute)
        optimizer = torch.optim.Adam(runner.parameters(), lr=0.01)
        grads = {}
        for step in range(STEPS):
            optimizer.zero_grad()
            x, y = batch(step)
            runner.step(x, target=y)
            if step == 0:
                grads = {name: p.grad.clone() for name, p in runner.named_parameters()}
            optimizer.step()
        results[config] = {"grads": grads, "weights": runner.state_dict()}
    return results


def meta_model(rank: int, world_size: int, reference_state: dict) -> dict:
    """A model built on the meta device: each rank allocates only its stages, then loads weights."""
    with torch.device("meta"):
        model = mlp()
    pipe = conveyor.pipeline(model, n_stages=world_size)
    runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=2, loss_fn=mse)
    others_on_meta = all(p.is_meta for stage in range(world_size) if stage != rank
                         for p in pipe.stage_module(stage).parameters())
    initialised_finite = all(torch.isfinite(p).all().item() for p in runner.parameters())
    runner.load_state_dict(reference_state)
    x, y = batch(0)
    runner.step(x, target=y)
    return {"others_on_meta": others_on_meta, "mine_on_meta": any(p.is_meta for p in runner.parameters()),
            "finite": initialised_finite, "grads": {n: p.grad.clone() for n, p in runner.named_parameters()}}


HAND_WRITTEN = """
# a 2-rank program written by hand: rank 0 runs both forwards first, rank 1 alternates
0F0 0F1 0B1 0B0
1F0 1B0 1F1 1B1
"""


def custom_schedule(rank: int, world_size: int) -> dict:
    program = conveyor.Schedule.from_text(HAND_WRITTEN)
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule=program, n_microbatches=2,
                                     loss_fn=mse)
    x, y = batch(0)
    runner.step(x, target=y)
    return {n: p.grad.clone() for n, p in runner.named_parameters()}


def _poison(module: object, args: object, output: torch.Tensor) -> torch.Tensor:
    return output * float("nan")


def nan_in_stage(rank: int, world_size: int, detect: bool) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="1f1b", n_microbatches=4,
                                     loss_fn=mse, detect_anomaly=detect)
    x, y = batch(0)
    runner.step(x, target=y)  # a clean step first
    if rank == 1:
        runner.stages[1].module.register_forward_hook(_poison)
    runner.step(x, target=y)


def kill_mid_step(rank: int, world_size: int, pid_dir: str) -> None:
    import os
    import signal
    from pathlib import Path

    Path(pid_dir, f"{rank}.pid").write_text(str(os.getpid()))
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=8, loss_fn=mse)
    if rank == 2:
        runner.stages[2].module.register_forward_hook(
            lambda module, args, output: os.kill(os.getpid(), signal.SIGKILL) if runner.trace is not None else None)
    x, y = batch(0)
    runner.step(x, target=y)


def stop_answering(rank: int, world_size: int) -> None:
    import time

    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="gpipe",
                                     n_microbatches=2, loss_fn=mse)
    if rank == 1:
        time.sleep(120)
    x, y = batch(0)
    runner.step(x, target=y)


def tied_meta_copies(rank: int, world_size: int) -> torch.Tensor:
    """Each rank initialises its stages with its own random stream; ties must still start equal."""
    from models import TiedLM, tied_pipe, token_loss

    with torch.device("meta"):
        model = TiedLM()
    torch.manual_seed(1000 + rank)
    runner = conveyor.PipelineRunner(tied_pipe(model), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    return dict(runner.named_parameters()).get("embed.weight", torch.empty(0)).detach().clone()


def precision_step(rank: int, world_size: int, precision: str, inject_inf_on: int | None) -> dict:
    """One step under ``precision``; rank ``inject_inf_on`` poisons one of its gradients before the
    optimizer step. Returns what every rank decided and its parameters before and after."""
    from models import mlp32

    x, y = batch32()
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp32(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=4, loss_fn=mse, precision=precision)
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.1)
    runner.step(x, target=y)
    scaled = {n: p.grad.clone() for n, p in runner.named_parameters()}
    if rank == inject_inf_on:
        next(runner.parameters()).grad.view(-1)[0] = float("inf")
    before = {n: p.detach().clone() for n, p in runner.named_parameters()}
    scale_before = runner.loss_scale
    stepped = runner.optimizer_step(optimizer)
    return {"stepped": stepped, "scale_before": scale_before, "scale_after": runner.loss_scale, "before": before,
            "after": {n: p.detach().clone() for n, p in runner.named_parameters()}, "scaled_grads": scaled,
            "grads": {n: p.grad.clone() for n, p in runner.named_parameters()},
            "dtypes": {n: p.dtype for n, p in runner.named_parameters()}}


def host_staged(rank: int, world_size: int, schedule: str, late: int, transports: list[str]) -> dict:
    """Gradients with the host-staged transport on CPU (a copy per value, reported ``late``)."""
    from conveyor.runtime.staged import CpuStager, HostStagedTransport

    n_stages = 2 * world_size if schedule in ("zb-v", "interleaved-1f1b") else world_size
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=n_stages), schedule=schedule,
                                     n_microbatches=4, loss_fn=mse, transport=transports[rank])
    staged = isinstance(runner.transport, HostStagedTransport)
    if staged:
        runner.transport.stager = CpuStager(late=late)
    grads = {}
    for step in range(2):
        for p in runner.parameters():
            p.grad = None
        x, y = batch(step)
        runner.step(x, target=y)
        grads[step] = {n: p.grad.clone() for n, p in runner.named_parameters()}
    return {"grads": grads, "staged": staged, "deferred": runner.transport.deferred if staged else 0,
            "copies": runner.transport.stager.copies if staged else 0, "transport": type(runner.transport).__name__}


def gpu_host_staged(rank: int, world_size: int) -> dict:
    """Two ranks on one GPU over gloo: the runner picks cuda and the host-staged transport itself."""
    from models import mlp32

    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp32(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=4, loss_fn=mse)
    x, y = batch32()
    runner.step(x, target=y)
    return {"transport": type(runner.transport).__name__,
            "grads": {n: p.grad.cpu() for n, p in runner.named_parameters()}}


def bf16_stream(rank: int, world_size: int) -> dict:
    """PipeDream (weights stashed, updates inside the pipeline) with bf16 autocast."""
    from models import mlp32

    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp32(), n_stages=world_size), schedule="pipedream",
                                     n_microbatches=2, loss_fn=mse, precision="bf16")
    optimizer = torch.optim.SGD(runner.parameters(), lr=0.01)
    before = {n: p.detach().clone() for n, p in runner.named_parameters()}
    losses = list(runner.stream([batch32() for _ in range(3)], optimizer))
    return {"losses": losses, "moved": all(not torch.equal(p, before[n]) for n, p in runner.named_parameters()),
            "dtypes": {p.dtype for p in runner.parameters()}}


def transport_sequence(rank: int, world_size: int, sizes_per_step: list[list[int]], late: str,
                       kind: str = "direct") -> list:
    """Rank 0 sends rank 1, over the plain transport, values whose sizes jump around within and
    between steps (two message keys, two messages each in turn); rank 1 returns what it received, per step.
    ``late``: "sender" (the receiver waits for each message, posting the next one meanwhile) or
    "receiver" (every send is posted before the first receive). ``kind``: the transport."""
    import time

    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, GRADIENT, Message

    transport = make_transport(kind, None, torch.device("cpu"))
    received: list = []
    for step, sizes in enumerate(sizes_per_step):
        messages = [Message(ACTIVATION if i // 2 % 2 == 0 else GRADIENT, 0, i) for i in range(len(sizes))]
        if rank == 0:
            transport.expect({})
            for i, (message, size) in enumerate(zip(messages, sizes)):
                value = torch.arange(size, dtype=torch.float32) + 1000 * step + i
                if late == "sender":
                    time.sleep(0.02)
                transport.send(1, message, (value, {"mask": value > 3}) if i % 3 == 0 else value)
                value.zero_()  # the transport must have taken its own copy
            transport.finish()
        else:
            transport.expect({0: messages})
            if late == "receiver":
                time.sleep(0.3)  # every send is posted before the first receive
            received.append([transport.receive(message, 0) for message in messages])
            transport.finish()
    return received


def transport_values(rank: int, world_size: int, values: list, kind: str) -> list:
    """Rank 0 sends ``values`` to rank 1 over the transport ``kind``, one message each, zeroing
    every tensor once its send has returned; rank 1 returns what it received."""
    from conveyor.runtime.bundle import flatten
    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, Message

    transport = make_transport(kind, None, torch.device("cpu"))
    messages = [Message(ACTIVATION, 0, i) for i in range(len(values))]
    if rank == 0:
        transport.expect({})
        for message, value in zip(messages, values):
            transport.send(1, message, value)
            for tensor in flatten(value)[1]:
                tensor.zero_()
        transport.finish()
        return []
    transport.expect({0: messages})
    received = [transport.receive(message, 0) for message in messages]
    transport.finish()
    return received


def socket_backlog(rank: int, world_size: int, count: int, floats: int) -> dict:
    """Rank 0 sends ``count`` values of ``floats`` floats (inline over the socket) to rank 1,
    which starts reading only after rank 0 has queued them all; rank 0 overwrites each value
    once its send has returned."""
    from conveyor.runtime.devices import make_transport
    from conveyor.schedule.links import ACTIVATION, Message

    transport = make_transport("sockets", None, torch.device("cpu"))
    messages = [Message(ACTIVATION, 0, i) for i in range(count)]
    if rank == 0:
        transport.expect({})
        for message in messages:
            value = torch.full((floats,), float(message.microbatch))
            transport.send(1, message, value)
            value.zero_()  # a queued send must have taken its own copy
        dist.barrier()  # every send has returned before rank 1 reads anything
        transport.finish()
        return {"queued": transport.queued_sends, "transport": type(transport).__name__}
    transport.expect({0: messages})
    dist.barrier()
    values = [transport.receive(message, 0) for message in messages]
    transport.finish()
    return {"intact": all(bool((value == index).all()) and value.numel() == floats
                          for index, value in enumerate(values))}


# --- the watchdog (tests/test_faults.py): ranks that disagree, stall or leave ----------------------
def _watched_runner(world_size: int, transport: str = "auto", **options: object) -> conveyor.PipelineRunner:
    return conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b", n_microbatches=8,
                                   loss_fn=mse, transport=transport, **options)


def _mark(path: str | None) -> None:
    """Write when the faulty call starts (time.monotonic() is one clock for every process on Linux)."""
    import time
    from pathlib import Path

    if path is not None:
        Path(path).write_text(repr(time.monotonic()))


def step_against_forward(rank: int, world_size: int, transport: str, mark: str | None = None,
                         job_store: bool = True) -> None:
    """Two clean steps, then call 3: forward() on the last rank, step() elsewhere; the last rank
    then goes on to step() (its call 4). ``job_store=False``: the runner's rank 0 serves the
    watchdog's store (as without conveyor.launch or torchrun's agent store)."""
    import os

    if not job_store:
        os.environ.pop("CONVEYOR_STORE")
    runner = _watched_runner(world_size, transport)
    x, y = batch(0)
    for _ in range(2):
        runner.step(x, target=y)
    if rank == 0:
        _mark(mark)
    if rank == world_size - 1:
        runner.forward(x)
    runner.step(x, target=y)


def skip_last_step(rank: int, world_size: int, transport: str, stall_timeout: float) -> None:
    """Rank 1 makes one step fewer than the others and then stays alive."""
    import time

    runner = _watched_runner(world_size, transport, stall_timeout=stall_timeout)
    x, y = batch(0)
    for _ in range(STEPS - 1 if rank == 1 else STEPS):
        runner.step(x, target=y)
    if rank == 1:
        time.sleep(120)


def stuck_in_forward(rank: int, world_size: int, transport: str, stall_timeout: float | None,
                     mark: str | None = None) -> None:
    """Rank 1 never returns from its forward of call 2 (stall_timeout None: the default)."""
    import time

    options = {} if stall_timeout is None else {"stall_timeout": stall_timeout}
    runner = _watched_runner(world_size, transport, **options)
    x, y = batch(0)
    runner.step(x, target=y)
    if rank == 1:
        runner.stages[1].module.register_forward_hook(lambda module, args, output: time.sleep(3600))
    if rank == 0:
        _mark(mark)
    runner.step(x, target=y)


def slow_actions(rank: int, world_size: int, transport: str, seconds: float, stall_timeout: float) -> float | None:
    """Every forward of the last stage takes ``seconds`` (so rank 0 waits for its first gradient
    for several of them); returns the mean loss of one step (on the last rank)."""
    import time

    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="gpipe",
                                     n_microbatches=4, loss_fn=mse, transport=transport, stall_timeout=stall_timeout)
    if rank == world_size - 1:
        runner.modules[-1].register_forward_hook(lambda module, args, output: time.sleep(seconds))
    x, y = batch(0)
    loss = runner.step(x, target=y)
    return None if loss is None else float(loss)


def leave_early(rank: int, world_size: int, transport: str, how: str, mark: str | None = None) -> None:
    """Rank 1 makes one step fewer, then returns (``how="return"``) or closes its runner and
    stays alive (``how="close"``)."""
    import time

    runner = _watched_runner(world_size, transport)
    x, y = batch(0)
    for index in range(STEPS - 1 if rank == 1 else STEPS):
        if rank == 0 and index == STEPS - 1:
            _mark(mark)
        runner.step(x, target=y)
    if rank == 1 and how == "close":
        runner.close()
        time.sleep(120)


def different_microbatch_counts(rank: int, world_size: int) -> None:
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=world_size), schedule="1f1b",
                                     n_microbatches=8 if rank == 0 else 4, loss_fn=mse)
    x, y = batch(0)
    runner.step(x, target=y)


def runners_in_a_loop(rank: int, world_size: int, count: int) -> tuple[int, int, int, int]:
    """Build, step and close ``count`` runners: (threads, open files) before and after."""
    import os
    import threading

    def open_files() -> int:
        return len(os.listdir("/proc/self/fd"))

    x, y = batch(0)
    with _watched_runner(world_size) as runner:  # the first one opens what stays open (gloo, imports)
        runner.step(x, target=y)
    before = threading.active_count(), open_files()
    for _ in range(count):
        with _watched_runner(world_size) as runner:
            runner.step(x, target=y)
    return (*before, threading.active_count(), open_files())
