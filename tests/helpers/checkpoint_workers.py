"""Functions run on every rank by conveyor.launch in tests/test_checkpoint.py; each returns what
its rank holds (tensors keyed by the unsplit model's names) for the test process to compare."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

import conveyor
from conveyor import checkpoint

from models import batch, mlp, mse

N_MICROBATCHES = 4


def make_runner(n_stages: int, *, schedule: str = "1f1b", dtype: torch.dtype = torch.float64,
                dropout: float = 0.0, seed: int = 0,
                lr: float = 0.01, weight_decay: float = 0.1) -> tuple[conveyor.PipelineRunner, torch.optim.Adam]:
    pipe = conveyor.pipeline(mlp(seed=seed, dropout=dropout).to(dtype), n_stages=n_stages)
    runner = conveyor.PipelineRunner(pipe, schedule=schedule, n_microbatches=N_MICROBATCHES, loss_fn=mse)
    return runner, torch.optim.Adam(runner.parameters(), lr=lr, weight_decay=weight_decay)


def train(runner: conveyor.PipelineRunner, optimizer: torch.optim.Optimizer, steps: range,
          dtype: torch.dtype = torch.float64) -> None:
    for step in steps:
        optimizer.zero_grad()
        x, y = batch(step)
        runner.step(x.to(dtype), target=y.to(dtype))
        optimizer.step()


def held(runner: conveyor.PipelineRunner, optimizer: torch.optim.Optimizer) -> dict:
    """This rank's model tensors, Adam state and hyperparameters, by parameter name."""
    names = {id(p): n for n, p in runner.named_parameters()}
    state = {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    hyper = {names[id(p)]: {k: v for k, v in g.items() if k != "params"}
             for g in optimizer.param_groups for p in g["params"]}
    return {"model": {k: v.clone() for k, v in runner.state_dict().items()}, "optim": state, "hyper": hyper}


# --- round trip: 4 stages -> 2 stages -> 1 process -> (plain module in the test) -> 4 stages ------
def train_then_save(rank: int, world_size: int, path: str) -> dict:
    runner, optimizer = make_runner(world_size)
    train(runner, optimizer, range(2))
    checkpoint.save(runner, path, optimizer, step=2, extra={"note": "round trip"})
    return held(runner, optimizer)


def load_then_save(rank: int, world_size: int, source: str, destination: str | None) -> dict:
    """Fresh weights (another seed) and an optimizer with other hyperparameters, then load."""
    runner, optimizer = make_runner(world_size, seed=1, lr=0.5, weight_decay=0.0)
    manifest = checkpoint.load(runner, source, optimizer)
    if destination is not None:
        checkpoint.save(runner, destination, optimizer, step=manifest["step"])
    return held(runner, optimizer)


# --- exact resume ---------------------------------------------------------------------------------
RESUME_STEPS = 3


def straight_run(rank: int, world_size: int, root: str, schedules: list[str]) -> dict:
    """2N steps without a break, saving after N; float32 with dropout (so RNG state matters)."""
    out = {}
    for schedule in schedules:
        torch.manual_seed(rank)
        runner, optimizer = make_runner(world_size, schedule=schedule, dtype=torch.float32, dropout=0.2)
        train(runner, optimizer, range(RESUME_STEPS), torch.float32)
        checkpoint.save(runner, Path(root) / schedule, optimizer, step=RESUME_STEPS)
        train(runner, optimizer, range(RESUME_STEPS, 2 * RESUME_STEPS), torch.float32)
        out[schedule] = runner.state_dict()
    return out


def resumed_run(rank: int, world_size: int, root: str, schedules: list[str]) -> dict:
    out = {}
    for schedule in schedules:
        torch.manual_seed(1000 + rank)
        runner, optimizer = make_runner(world_size, schedule=schedule, dtype=torch.float32, dropout=0.2, seed=1)
        step = checkpoint.load(runner, Path(root) / schedule, optimizer)["step"]
        train(runner, optimizer, range(step, 2 * RESUME_STEPS), torch.float32)
        out[schedule] = runner.state_dict()
    return out


# --- failures while saving ------------------------------------------------------------------------
def _wait_for(file: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{file} never appeared")
        time.sleep(0.01)


def _after_rank_0_wrote(action: str):  # noqa: ANN202 - a replacement for checkpoint._write_tensors
    """On rank 1: write the model file, wait until rank 0 wrote both of its files, then, for the
    train file, write half of it and die (``crash``) or raise (``raise``)."""
    original = checkpoint._write_tensors

    def write(tensors: dict, file: Path) -> None:
        if file.name.startswith("model"):
            original(tensors, file)
            return
        _wait_for(file.parent / "train-00000.safetensors")
        original(tensors, file)
        with open(file, "r+b") as handle:
            handle.truncate(os.path.getsize(file) // 2)
        if action == "crash":
            os._exit(3)
        raise OSError(28, "No space left on device (simulated)")

    return write


def save_then_fail_to_save(rank: int, world_size: int, path: str) -> dict:
    """Save after 1 step; then a second save into the same path fails on rank 1 (an exception)."""
    runner, optimizer = make_runner(world_size)
    train(runner, optimizer, range(1))
    checkpoint.save(runner, path, optimizer, step=1)
    saved = held(runner, optimizer)
    train(runner, optimizer, range(1, 2))
    if rank == 1:
        checkpoint._write_tensors = _after_rank_0_wrote("raise")
    try:
        checkpoint.save(runner, path, optimizer, step=2)
        error = None
    except Exception as caught:
        error = f"{type(caught).__name__}: {caught}"
    return {"saved": saved, "error": error, "entries": sorted(os.listdir(path))}


def load_train_and_crash_while_saving(rank: int, world_size: int, path: str) -> None:
    """Load, train a step, save into the same path: rank 1 dies after rank 0 wrote its files."""
    runner, optimizer = make_runner(world_size)
    checkpoint.load(runner, path, optimizer)
    train(runner, optimizer, range(1, 2))
    if rank == 1:
        checkpoint._write_tensors = _after_rank_0_wrote("crash")
    checkpoint.save(runner, path, optimizer, step=2)


# --- mismatches and ties --------------------------------------------------------------------------
def tied_save_and_reload(rank: int, world_size: int, path: str) -> dict:
    """TiedLM on 3 stages (embed.weight on stages 0 and 2): train, save, reload into fresh runners."""
    from models import TiedLM, tied_pipe, token_loss

    runner = conveyor.PipelineRunner(tied_pipe(TiedLM()), schedule="1f1b", n_microbatches=2, loss_fn=token_loss)
    optimizer = torch.optim.Adam(runner.parameters(), lr=0.05, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    ids, target = (torch.randint(0, 11, (4, 5), generator=generator) for _ in range(2))
    runner.step(ids, target=target)
    optimizer.step()
    checkpoint.save(runner, path, optimizer, step=1)
    fresh = conveyor.PipelineRunner(tied_pipe(TiedLM(seed=1)), schedule="1f1b", n_microbatches=2,
                                    loss_fn=token_loss)
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.05, weight_decay=0.1)
    checkpoint.load(fresh, path, fresh_optimizer)
    return {"saved": held(runner, optimizer), "loaded": held(fresh, fresh_optimizer)}
