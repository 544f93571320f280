"""Every error message docs/errors.md quotes is what the code says: each is triggered and its text
compared with the quote (placeholders such as ``N``, ``'x'``, ``[...]`` and ``...`` stand for any
value); the few that cannot be triggered cheaply (SOURCE_ONLY) are looked up in the source instead."""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import json
import multiprocessing as mp
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh

import conveyor
from conveyor import checkpoint, cli_train
from conveyor.checkpoint_dtensor import job_of
from conveyor.cli import main
from conveyor.runtime.bundle import flatten
from conveyor.runtime.codec import decode_head
from conveyor.runtime.socket_mesh import _connect, join_mesh
from conveyor.schedule import Schedule, make_schedule
from conveyor.schedule.validate import validate

import mesh_workers
import workers
from models import TiedLM, batch, mlp, mse, tied_pipe, token_loss

ROOT = Path(__file__).resolve().parents[1]
ERRORS = ROOT / "docs" / "errors.md"
PLACEHOLDER = re.compile(r"\[\.\.\.\]|\.\.\.|<[^>]+>|'[a-z]'|\b(?:[A-Z]|SFM|PATH|FILE|NAME|DIR|i)\b")
CLASS_NAME = re.compile(r"(?:conveyor\.)?[A-Z]\w*Error")


def _rows() -> list[list[str]]:
    """The quoted texts of each table row's first column."""
    rows = []
    for line in ERRORS.read_text().splitlines():
        if line.startswith("| `"):
            rows.append(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
    return rows


def _pattern(quoted: str) -> re.Pattern[str]:
    parts, position = [], 0
    for match in PLACEHOLDER.finditer(quoted):
        parts.append(re.escape(quoted[position:match.start()]))
        token = match.group()
        parts.append(r"'[^']*'" if token.startswith("'") else r"\[.*?\]" if token == "[...]" else
                     r".*?" if token == "..." or token.startswith("<") else r"\S+?")
        position = match.end()
    parts.append(re.escape(quoted[position:]))
    return re.compile("".join(parts), re.DOTALL)


def test_placeholders_stand_for_values_but_the_words_must_match() -> None:
    quote = "cannot cut N layers into K stages: use one of [...]; 'x' ..."
    assert _pattern(quote).search("cannot cut 8 layers into 9 stages: use one of ['a', 'b']; 'gpipe' and more")
    assert not _pattern(quote).search("cannot split 8 layers into 9 stages: use one of ['a']; 'gpipe'")
    assert not _pattern(quote).search("cannot cut 8 layers into 9 pieces: use one of ['a']; 'gpipe'")


# --- triggers: each returns the exception the documented situation raises ---------------------------
@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _raised(action: Callable[[], object]) -> BaseException:
    try:
        action()
    except BaseException as error:  # noqa: BLE001 - the error is what is being checked
        return error
    raise AssertionError("no error was raised")


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class _Flag(_Blocks):
    def forward(self, x: torch.Tensor, scale: bool = False, offset: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(x * 2 if scale else x + 1)


def _flagged() -> conveyor.LocalPipeline:
    """A one-stage traced pipe whose forward took ``scale=False`` at trace time."""
    pipe = conveyor.pipeline(_Flag(), n_stages=1, example_args=(torch.randn(2, 4),),
                             example_kwargs={"scale": False})
    return conveyor.LocalPipeline(pipe, schedule="gpipe", n_microbatches=1)


class _ValueDependent(_Blocks):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x) if x.sum() > 0 else self.blocks[1](x)


class _TwoInputs(nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a + b


class _Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in the user's layer")


def _one_rank_runner(model: nn.Module | list, **options: object) -> conveyor.PipelineRunner:
    options.setdefault("schedule", "1f1b")
    options.setdefault("n_microbatches", 2)
    return conveyor.PipelineRunner(conveyor.pipeline(model, n_stages=1) if isinstance(model, nn.Sequential)
                                   else conveyor.pipeline(model), **options)


def _meta_time_balance() -> None:
    with torch.device("meta"):
        model = _Blocks()
    conveyor.pipeline(model, n_stages=2, balance="time", example_args=(torch.randn(2, 4),))


def _checkpoint_of_another_model(tmp: Path) -> None:
    _one_rank_runner(mlp(), loss_fn=mse).save(tmp / "ckpt")
    other = nn.Sequential(nn.Linear(6, 3), *[nn.Identity() for _ in range(8)], nn.Linear(3, 3)).double()
    _one_rank_runner(other, loss_fn=mse).load(tmp / "ckpt")  # 0.* reshaped, 2.* .. 6.* gone, 9.* new


def _reraise(error: BaseException) -> None:
    raise error


def _rank_one_cannot_write(rank: int, world_size: int, path: str) -> BaseException | None:
    """Rank 1's write fails; what rank 0 (whose own write worked) raises is returned."""
    import conveyor.checkpoint as checkpoint

    torch.set_num_threads(1)
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="gpipe", n_microbatches=1)
    if rank == 1:
        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(28, "No space left on device")
        checkpoint._write_tensors = full_disk
    try:
        runner.save(path)
    except Exception as error:  # noqa: BLE001 - returned to the test
        return error
    return None


class _Tied(_Blocks):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.head.weight = self.blocks[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x))


def _pipedream_on_tied_weights(rank: int, world_size: int) -> None:
    torch.set_num_threads(1)
    pipe = conveyor.pipeline(_Tied(), n_stages=2, example_args=(torch.randn(2, 4),))
    conveyor.PipelineRunner(pipe, schedule="pipedream", n_microbatches=2, loss_fn=nn.functional.mse_loss)


def _rank_zero_leaves(rank: int, world_size: int) -> None:
    """Rank 0 returns without running its step, so rank 1 waits for an activation that never comes."""
    torch.set_num_threads(1)
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="gpipe", n_microbatches=1,
                                     loss_fn=mse)
    if rank == 1:
        runner.step(*batch(0)[:1], target=batch(0)[1])


def _rank_zero_drops_its_connections(rank: int, world_size: int) -> None:
    """Rank 0 closes its connections without a word to the watchdog (as a dying process would) and
    stays, so rank 1 waits for an activation that never comes. (A rank that returns early is named
    as the one that left: `PeerLeftError`.)"""
    torch.set_num_threads(1)
    runner = conveyor.PipelineRunner(conveyor.pipeline(mlp(), n_stages=2), schedule="gpipe", n_microbatches=1,
                                     loss_fn=mse, transport="sockets")
    if rank == 0:
        runner.transport.close()
        time.sleep(60)
    runner.step(*batch(0)[:1], target=batch(0)[1])


def _checkpoint_of_another_optimizer(tmp: Path) -> None:
    runner = _one_rank_runner(mlp(), loss_fn=mse)
    adam = torch.optim.AdamW(runner.parameters())
    x, y = batch(0)
    runner.step(x, target=y)
    adam.step()
    runner.save(tmp / "ckpt", adam)
    runner.load(tmp / "ckpt", torch.optim.SGD(runner.parameters(), lr=0.1, momentum=0.9))


def _raise_on_rank_zero(rank: int, world_size: int) -> None:
    raise ValueError(f"rank {rank} gives up")


def _kill_rank_zero(rank: int, world_size: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep(rank: int, world_size: int) -> None:
    time.sleep(30)


def _outside_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    conveyor.run(_sleep)


def _without_process_group(action: Callable[[], object]) -> None:
    """Run ``action`` with no process group (the module's one-rank group is rebuilt afterwards)."""
    dist.destroy_process_group()
    try:
        action()
    finally:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _damaged_checkpoint(tmp: Path, damage: Callable[[Path, str], None]) -> None:
    """Save the MLP, ``damage(checkpoint, its model file)``, then load it."""
    path = tmp / "ckpt"
    checkpoint.save_full(mlp(), path)
    damage(path, json.loads((path / "manifest.json").read_text())["ranks"][0]["model"])
    checkpoint.load_full(path)


def _edit_manifest(path: Path, edit: Callable[[dict], None]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_bytes(path: Path, file: str) -> None:
    data = bytearray((path / file).read_bytes())
    data[-16:] = bytes(255 - b for b in data[-16:])
    (path / file).write_bytes(bytes(data))


def _point_outside(path: Path, file: str) -> None:
    def edit(manifest: dict) -> None:
        for entry in manifest["tensors"].values():
            entry["file"] = "../outside.safetensors"
        manifest["checksums"]["../outside.safetensors"] = manifest["checksums"][file]
    shutil.copy(path / file, path.parent / "outside.safetensors")
    _edit_manifest(path, edit)


def _foreign_file_unverified(path: Path, file: str) -> None:
    other = path.parent / "other"
    checkpoint.save_full(nn.Linear(2, 2), other)
    _edit_manifest(path, lambda manifest: manifest.pop("checksums"))
    shutil.copy(other / json.loads((other / "manifest.json").read_text())["ranks"][0]["model"], path / file)


def _refuse_launch(*args: object, **kwargs: object) -> None:
    raise AssertionError("conveyor.launch was called: the command line was not checked first")


def _conveyor(monkeypatch: pytest.MonkeyPatch, *argv: str) -> None:
    """Run the ``conveyor`` command (no processes may start); raise what it wrote to stderr."""
    monkeypatch.setattr(conveyor, "launch", _refuse_launch)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            status = main(list(argv))
        except SystemExit as exit_info:
            status = exit_info.code
    raise RuntimeError(f"conveyor {' '.join(argv)} exited with status {status}:\n{stderr.getvalue()}")


def _without_matplotlib(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if matplotlib were not installed


def _unusable_checkpoint_dir(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp / "a-file"
    blocker.write_text("not a folder")
    _conveyor(monkeypatch, *TRAIN, "--checkpoint-dir", str(blocker / "ckpt"))


def _timeline_picture_without_matplotlib(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _without_matplotlib(monkeypatch)
    _conveyor(monkeypatch, *TRAIN, "--timeline", str(tmp / "t.png"))


def _draw_without_matplotlib(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = conveyor.schedule.simulate("1f1b", 2, 2).events
    _without_matplotlib(monkeypatch)
    conveyor.timeline.render(events, tmp / "t.png")


@functools.cache
def _rank_zero_left() -> BaseException:
    """One launch (shared by the two rows quoting its message) in which rank 0 leaves early."""
    return _raised(lambda: conveyor.launch(_rank_zero_leaves, 2, timeout=120))


def _launcher_dies() -> None:
    """A rank's watchdog in a forked child (launch forks its ranks too) whose launcher's end of the
    lifeline closes, as the kernel closes it when the launcher is killed; raises what the rank
    wrote to its stderr and its exit status."""
    watch_launcher = importlib.import_module("conveyor.launch")._watch_launcher  # conveyor.launch is the function
    reader, writer = mp.Pipe(duplex=False)
    stderr_read, stderr_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the rank
        try:
            os.dup2(stderr_write, 2)
            writer.close()
            watch_launcher(0, reader)
            time.sleep(30)
        finally:
            os._exit(1)
    os.close(stderr_write)
    reader.close()
    writer.close()  # the launcher is gone
    _, status = os.waitpid(pid, 0)
    with os.fdopen(stderr_read) as stderr:
        raise RuntimeError(f"exit status {os.waitstatus_to_exitcode(status)}: {stderr.read()}")


def _stranger_then_timeout() -> None:
    """Rank 0 of two joins the socket mesh; a stranger without the job's secret has already
    connected as rank 1 (it waits in the listener's backlog), and the real rank 1 never comes."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    port = listener.getsockname()[1]

    def stranger() -> None:
        with contextlib.suppress(Exception):
            _connect(1, 0, port, os.urandom(32), time.monotonic() + 5, 5)

    thread = threading.Thread(target=stranger, daemon=True)
    thread.start()
    try:
        join_mesh(0, [port, port + 1], os.urandom(32), listener, 1.5)
    finally:
        thread.join(10)
        listener.close()


def _mesh_runner(**options: object) -> conveyor.PipelineRunner:
    options = {"schedule": "1f1b", "n_microbatches": 2, "loss_fn": mse, **options}
    return conveyor.PipelineRunner(options.pop("pipe", None) or conveyor.pipeline(mlp(), n_stages=1), **options)


def _fsdp1(module: nn.Module, mesh: object) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    class Fsdp1(FullyShardedDataParallel):  # FSDP1 cannot be built on a CPU-only machine: its type suffices
        def __init__(self, inner: nn.Module) -> None:
            nn.Module.__init__(self)
            self.inner = inner

    return Fsdp1(module)


def _closed_runner() -> None:
    runner = _one_rank_runner(mlp(), loss_fn=mse)
    runner.close()
    runner.step(*batch(0)[:1], target=batch(0)[1])


class _WithSpare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(6, 6).double(), nn.Linear(6, 6).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


TRAIN = ["train", str(ROOT / "examples" / "train_mlp.py"), "--stages", "2", "--microbatches", "4", "--steps", "2"]


def _triggers(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], object]]:
    """Per quoted message (or joined quotes of one row), what raises it; nothing runs until called."""
    m2 = dict(n_microbatches=2)
    triggers: dict[str, Callable[[], object]] = {
        # splitting
        "balance=[...] covers N layers but the model has K": lambda: conveyor.pipeline(mlp(), balance=[3, 3, 1]),
        "balance=[...] has an empty stage": lambda: conveyor.pipeline(mlp(), balance=[0, 8]),
        "cannot cut N layers into K stages": lambda: conveyor.pipeline(mlp(), n_stages=9),
        "n_stages=K but N stage modules were given":
            lambda: conveyor.pipeline([nn.Linear(2, 2), nn.Linear(2, 2)], n_stages=3),
        "split point 'x' is not a submodule of M; did you mean 'y' or ...? (split points are names from "
        "model.named_modules())":
            lambda: conveyor.pipeline(_Blocks(), split_points=["blocks.l"], example_args=(torch.randn(2, 4),)),
        "split points are out of execution order":
            lambda: conveyor.pipeline(_Blocks(), split_points=["blocks.1", "blocks.0"],
                                      example_args=(torch.randn(2, 4),)),
        "cannot cut M into K stages: it has N cuttable blocks":
            lambda: conveyor.pipeline(_Blocks(), n_stages=3, example_args=(torch.randn(2, 4),)),
        "tracing M needs example inputs": lambda: conveyor.pipeline(_Blocks(), n_stages=2),
        "torch.export could not capture M.forward: ...":
            lambda: conveyor.pipeline(_ValueDependent(), n_stages=2, example_args=(torch.randn(2, 4),)),
        "balance='time' cannot profile M: it is on the meta device": _meta_time_balance,
        "argument 'x' is V but M was traced with ...": lambda: _flagged().forward(torch.randn(2, 4), scale=True),
        "argument 'x' was not given when M was traced":
            lambda: _flagged().forward(torch.randn(2, 4), offset=torch.ones(2, 4)),
        # generation
        "generate() needs a pipe cut from a Hugging Face causal LM":
            lambda: conveyor.LocalPipeline(conveyor.pipeline([nn.Linear(4, 4)]), schedule="gpipe",
                                           **m2).generate(torch.zeros(2, 3, dtype=torch.long), 2),
        "generate() supports Hugging Face decoder-only causal LMs of the types ...":
            lambda: conveyor.LocalPipeline(conveyor.pipeline(_Blocks(), n_stages=2, example_args=(torch.randn(2, 4),)),
                                           schedule="gpipe", **m2).generate(torch.zeros(2, 3, dtype=torch.long), 2),
        # runner construction: the schedule checks run where the runner builds its program
        "unknown schedule 'x'; choose one of [...]": lambda: _one_rank_runner(mlp(), schedule="zigzag"),
        "schedule 'gpipe' places one stage per rank, but the pipe has S stages for R ranks":
            lambda: make_schedule("gpipe", 2, 3, 4),
        "interleaved-1f1b ...": lambda: make_schedule("interleaved-1f1b", 2, 4, 1),
        "zb-v ...": lambda: make_schedule("zb-v", 2, 2, 4),
        "dualpipev needs at least 2 x R ranks = M micro-batches, got N": lambda: make_schedule("dualpipev", 2, 4, 3),
        "the program deadlocks: rank R waits at A for ...":
            lambda: validate(Schedule.from_text("0F0 0B0 0F1 0B1\n1F1 1B1 1F0 1B0")),
        "action A appears twice": lambda: validate(Schedule.from_text("0F0 0F0 0B0")),
        "has no backward": lambda: validate(Schedule.from_text("0F0 0F1 0B0")),
        "replicas=[...] places stages on N ranks, but there are R":
            lambda: make_schedule("1f1b", 2, 2, 4, replicas=[2, 1]),
        "schedule 'zb-h1' does not support replicated stages; use one of [...]":
            lambda: make_schedule("zb-h1", 3, 2, 4, replicas=[2, 1]),
        "stage S has K replicas, which must update together, so n_microbatches (M) must be a multiple of K":
            lambda: make_schedule("pipedream", 3, 2, 3, replicas=[2, 1]),
        "pipedream-2bw needs window >= n_stages": lambda: make_schedule("pipedream-2bw", 4, 4, 8, window=2),
        "schedule 'pipedream' updates each stage on its own, so tied weights across stages would drift apart":
            lambda: conveyor.launch(_pipedream_on_tied_weights, 2, timeout=120),
        "the program deadlocks: rank R waits at 0U0 for the other replicas of its stage":
            lambda: validate(Schedule.from_text("# placement: 0,1 2\n0F0v0 0B0 0U0\n0F1v0 0B1\n1F0 1B0 1F1 1B1\n")),
        "rank R runs 0F1v1 after only 0 updates of stage 0: version 1 does not exist yet":
            lambda: validate(Schedule.from_text("0F0 0F1v1 0B0 0U0 0B1")),
        # each step
        "step() trains and needs a loss": lambda: _one_rank_runner(mlp()).step(*batch(0)[:1], target=batch(0)[1]),
        "loss_fn needs a target": lambda: _one_rank_runner(mlp(), loss_fn=mse).step(batch(0)[0]),
        "the batch is empty": lambda: _one_rank_runner(mlp(), loss_fn=mse).step(batch(0)[0][:0],
                                                                                target=batch(0)[1][:0]),
        "a batch of B rows cannot be split into M micro-batches":
            lambda: _one_rank_runner(mlp(), loss_fn=mse, n_microbatches=4).step(*batch(0, rows=3)[:1],
                                                                                target=batch(0, rows=3)[1]),
        "input i has batch size ... but input 0 has ...":
            lambda: _one_rank_runner([_TwoInputs()], **m2).forward(torch.zeros(4, 2), torch.zeros(3, 2)),
        "loss_fn returned (8,), not a scalar tensor":
            lambda: _one_rank_runner(mlp(), loss_fn=lambda o, t: ((o - t) ** 2).mean(dim=1), schedule="gpipe")
            .step(batch(0)[0], target=batch(0)[1]),
        "the stage's output does not require grad":  # stage 0 of two, in one process
            lambda: conveyor.LocalPipeline(conveyor.pipeline([nn.Sequential(nn.Linear(6, 6, dtype=torch.float64),
                                                                            _Detach()), nn.Linear(6, 6).double()]),
                                           schedule="gpipe", n_microbatches=2, loss_fn=mse)
            .step(batch(0)[0], target=batch(0)[1]),
        "the stage's loss does not require grad":
            lambda: _one_rank_runner(nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), _Detach()), loss_fn=mse)
            .step(batch(0)[0], target=batch(0)[1]),
        "... contains a object at output[1]: only tensors ... can cross a stage boundary":
            lambda: flatten((torch.zeros(1), object()), "stage output"),
        "rank 1, stage 1, micro-batch 0, action 1F0: RuntimeError: ... (its input from stage 0 was "
        "[float64(2, 4)])": lambda: conveyor.launch(workers.mismatched_stages, 2, args=(4, 5, "float64"), timeout=60),
        "rank R, stage S, micro-batch M, action SFM: <the user's exception>":
            lambda: _one_rank_runner([_Boom()], **m2).forward(torch.zeros(4, 2)),
        "schedule 'pipedream' updates the weights inside the pipeline: train with runner.stream(batches, "
        "optimizer)": lambda: _one_rank_runner(mlp(), loss_fn=mse, schedule="pipedream").step(*batch(0)[:1],
                                                                                             target=batch(0)[1]),
        "schedule '1f1b' is synchronous: train it with step()":
            lambda: list(_one_rank_runner(mlp(), loss_fn=mse).stream([batch(0)], torch.optim.SGD([nn.Parameter(
                torch.zeros(1))], lr=0.1))),
        "optimizer got an empty parameter list": lambda: torch.optim.AdamW([]),
        # checkpoints
        " + ".join(MISFIT): lambda: _checkpoint_of_another_model(tmp),
        "saving the checkpoint failed on rank R while ...; the previous checkpoint at PATH (if any) is untouched":
            lambda: _reraise(conveyor.launch(_rank_one_cannot_write, 2, args=(str(tmp / "ckpt"),), timeout=120)[0]),
        "receiving activation of stage S from rank R failed: ...":
            lambda: conveyor.launch(_rank_zero_drops_its_connections, 2, timeout=120),
        "no checkpoint at PATH": lambda: _one_rank_runner(mlp()).load(tmp / "nowhere"),
        "the checkpoint holds X state, not Y": lambda: _checkpoint_of_another_optimizer(tmp),
        "checkpoints of a runner on a mesh of N ranks in a job of W ranks are not supported":
            lambda: job_of(SimpleNamespace(mesh=SimpleNamespace(size=lambda: 2), group=None)),  # a 1-rank job
        # processes
        "rank R failed": lambda: conveyor.launch(_raise_on_rank_zero, 1, timeout=60),
        "job timed out after T s; ranks [...] were still running": lambda: conveyor.launch(_sleep, 1, timeout=1),
        "conveyor.run needs torchrun's environment": lambda: _outside_torchrun(monkeypatch),
        # the watchdog (runtime/watchdog.py)
        "rank R: the ranks made different calls: rank 0 called step() (call 3, 8 micro-batches), rank 1 called "
        "forward() (call 3, 8 micro-batches)": lambda: conveyor.launch(workers.step_against_forward, 2,
                                                                      args=("sockets",), timeout=120),
        "rank 0: the ranks made different calls: rank 0 called step() (call 5, 8 micro-batches), rank 1 has made "
        "no call 5 (its last: step() (call 4, 8 micro-batches)), idle for T s":
            lambda: conveyor.launch(workers.skip_last_step, 2, args=("sockets", 3.0), timeout=120),
        "rank 0: rank 1 (stage 1) has been in action 1F0 for T s (stall_timeout 2 s); rank 0 is waiting for it in "
        "call 2 (step(), 8 micro-batches)": lambda: conveyor.launch(workers.stuck_in_forward, 2,
                                                                   args=("sockets", 2.0), timeout=120),
        "rank 0: rank 1 left the job after call 4; rank 0 is waiting for it in call 5 (step(), 8 micro-batches)":
            lambda: conveyor.launch(workers.leave_early, 2, args=("sockets", "return"), timeout=120),
        "the ranks built different PipelineRunners (n_microbatches: rank 0 8, rank 1 4): every rank must construct "
        "the runner with the same arguments": lambda: conveyor.launch(workers.different_microbatch_counts, 2,
                                                                      timeout=120),
    }
    triggers[" + ".join(KILLED)] = lambda: conveyor.launch(_kill_rank_zero, 1, timeout=60)
    triggers.update(_newer_triggers(tmp, monkeypatch))
    return triggers


def _newer_triggers(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Callable[[], object]]:
    """Checkpoint files, the command line, processes, runner options and the device mesh."""
    mesh = conveyor.mesh
    runner_no_gradient = ("rank R, stage S: parameter 'x' requires grad but got no gradient in this step; if it is "
                          "unused by design, pass unused_parameters=['x'] to PipelineRunner or set "
                          "requires_grad=False")
    return {
        # checkpoints
        "checkpoint PATH: file FILE: checksum mismatch: its bytes changed after it was saved (corrupted, truncated "
        "or replaced); restore it from a copy or load another checkpoint":
            lambda: _damaged_checkpoint(tmp, _flip_bytes),
        "checkpoint PATH: file FILE: is missing (the checkpoint was copied incompletely or its files deleted)":
            lambda: _damaged_checkpoint(tmp, lambda path, file: (path / file).unlink()),
        "checkpoint PATH: file FILE: is outside the checkpoint folder; refusing to read it (the manifest was edited "
        "or damaged)": lambda: _damaged_checkpoint(tmp, _point_outside),
        "checkpoint PATH: file FILE, tensor NAME: cannot be read as safetensors (...); it is truncated, corrupted or "
        "not a checkpoint file": lambda: _damaged_checkpoint(tmp, _foreign_file_unverified),
        "checkpoint PATH: file FILE: has no checksum in the manifest; the manifest is damaged":
            lambda: _damaged_checkpoint(tmp, lambda path, file: _edit_manifest(
                path, lambda manifest: manifest["checksums"].pop(file))),
        "checkpoint PATH: file manifest.json cannot be read (...); the manifest is damaged":
            lambda: _damaged_checkpoint(tmp, lambda path, file: (path / "manifest.json").write_text('{"format": "co')),
        # the conveyor command
        "argument --microbatches: must be at least 1, got 0":
            lambda: _conveyor(monkeypatch, "train", "--microbatches", "0"),
        "argument --checkpoint-every: must be at least 0, got -1":
            lambda: _conveyor(monkeypatch, "train", "--checkpoint-every", "-1"),
        "argument --timeout: must be greater than 0, got 0": lambda: _conveyor(monkeypatch, "train", "--timeout", "0"),
        "--checkpoint-dir 'DIR' is not usable: ... (checked before the first step; choose a writable folder)":
            lambda: _unusable_checkpoint_dir(tmp, monkeypatch),
        "--timeline (a picture) needs matplotlib, which is not installed: pip install 'conveyor[plot]'":
            lambda: _timeline_picture_without_matplotlib(tmp, monkeypatch),
        "drawing a timeline needs matplotlib, which is not installed: pip install 'conveyor[plot]'":
            lambda: _draw_without_matplotlib(tmp, monkeypatch),
        "TrainConfig.batch_size must be an integer >= 1, got 0":
            lambda: cli_train.TrainConfig(conveyor.workloads.WorkloadSpec(), batch_size=0),
        # processes
        "rank R returned while the other ranks still needed it: rank Q then failed waiting for it; every rank must "
        "make the same calls (the same number of steps, forward and stream calls)":
            lambda: _reraise(_rank_zero_left()),
        "conveyor: rank R: the launching process is gone; ending this rank": _launcher_dies,
        "socket set-up timed out after T s: rank(s) ... never connected and authenticated; refused N connection(s): "
        "a connection announcing rank R failed authentication (wrong secret)": _stranger_then_timeout,
        "not a conveyor message (it starts with ...)": lambda: decode_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
        "PipelineRunner needs a process group": lambda: _without_process_group(lambda: _one_rank_runner(mlp())),
        # runner options and steps
        "PipelineRunner got an unexpected option 'x'; runner options: ...; schedule 'y' takes: ...":
            lambda: _one_rank_runner(mlp(), recomptue=True),
        "n_microbatches must be at least 1, got 0": lambda: _one_rank_runner(mlp(), n_microbatches=0),
        "loss_weighting='x' is not one of 'rows', 'tokens'": lambda: _one_rank_runner(mlp(), loss_weighting="row"),
        "schedule 'pipedream' cannot honour loss_weighting='tokens': ...":
            lambda: _one_rank_runner(mlp(), schedule="pipedream", loss_weighting="tokens"),
        "timeout must be a positive number of seconds, got 0": lambda: _one_rank_runner(mlp(), timeout=0),
        "this PipelineRunner is closed: build a new one to run more steps": _closed_runner,
        runner_no_gradient: lambda: _one_rank_runner([_WithSpare()], loss_fn=mse).step(*batch(0)[:1],
                                                                                      target=batch(0)[1]),
        "unused_parameters names [...], which the model does not have: ...":
            lambda: _one_rank_runner(mlp(), unused_parameters=["0.wieght"]),
        # the device mesh
        "conveyor.mesh needs a process group": lambda: _without_process_group(lambda: mesh(pp=1)),
        "the mesh ... has N ranks but the job has R: make the sizes multiply to R (or launch N processes)":
            lambda: mesh(pp=2, dp=2),
        "unknown mesh dimension(s) [...]: conveyor knows [...]": lambda: mesh(pp=1, cp=1),
        "the mesh needs a 'pp' dimension (the pipeline's ranks), e.g. conveyor.mesh(pp=2, dp=2)": lambda: mesh(dp=1),
        "give either dp= or dp_replicate=/dp_shard= (HSDP), not both": lambda: mesh(pp=1, dp=1, dp_shard=1),
        "mesh dimension D=0 must be a positive integer": lambda: mesh(pp=1, dp=0),
        "mesh= takes a torch.distributed.device_mesh.DeviceMesh, not X": lambda: _mesh_runner(mesh={"pp": 1}),
        "the mesh has no dimension 'pp' (its dimensions: [...]): name the pipeline dimension with pp_dim=, ...":
            lambda: _mesh_runner(mesh=init_device_mesh("cpu", (1,), mesh_dim_names=("dp",))),
        "mesh dimension(s) [...] are neither the pipeline ('pp'), data parallel [...] nor tensor parallel [...]: ...":
            lambda: _mesh_runner(mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("pp", "cp"))),
        "pass mesh= or group=, not both: ...": lambda: _mesh_runner(mesh=mesh(pp=1), group=dist.group.WORLD),
        "replicas= and mesh= cannot be combined: ...": lambda: _mesh_runner(mesh=mesh(pp=1), replicas=[1]),
        "parallelize= needs mesh=: ...": lambda: _mesh_runner(parallelize=lambda module, m: module),
        "the mesh ... runs the pipeline on its 'pp' dimension of N ranks, which does not fit the schedule: ...":
            lambda: _mesh_runner(pipe=conveyor.pipeline(mlp(), n_stages=2), mesh=mesh(pp=1, dp=1)),
        "schedule 'pipedream' updates each stage inside the pipeline, so data-parallel and sharded stages cannot "
        "sync once per step: ...":
            lambda: _mesh_runner(mesh=mesh(pp=1), parallelize=lambda module, m: module, schedule="pipedream"),
        "parallelize returned X for stage S: return the module to run ...":
            lambda: _mesh_runner(mesh=mesh(pp=1), parallelize=lambda module, m: 3),
        "stage S's module is wrapped in FullyShardedDataParallel (FSDP1), which conveyor cannot drive micro-batch "
        "by micro-batch: use FSDP2, torch.distributed.fsdp.fully_shard":
            lambda: _mesh_runner(mesh=mesh(pp=1), parallelize=_fsdp1),
        "stage S's module is wrapped in nn.DataParallel (single-process, multi-thread), which conveyor cannot "
        "drive: ...": lambda: _mesh_runner(mesh=mesh(pp=1), parallelize=lambda module, m: nn.DataParallel(module)),
        "stage S: fully_shard was applied to [...] but not to the stage module itself; ...":
            lambda: _mesh_runner(mesh=mesh(pp=1, dp=1), parallelize=mesh_workers._fully_shard_children),
        "stage S is a traced graph that reads the parameters of 'x' without calling it, so the hooks put on 'x' "
        "(fully_shard, parallelize_module, ...) would never run: ...":
            lambda: _mesh_runner(pipe=conveyor.pipeline(mesh_workers.NamedNet(), n_stages=1,
                                                        example_args=(mesh_workers.global_batch(0)[0][:4],)),
                                 mesh=mesh(pp=1, dp=1),
                                 parallelize=lambda module, m: mesh_workers._fully_shard(module, m["dp"], True)),
        "parameters tied across stages ([...]) cannot be summed once they are sharded DTensors (FSDP2, tensor "
        "parallel): ...":
            lambda: _mesh_runner(pipe=tied_pipe(TiedLM()), mesh=mesh(pp=1, dp=1), schedule="interleaved-1f1b",
                                 loss_fn=token_loss,
                                 parallelize=lambda module, m: mesh_workers._fully_shard(module, m["dp"], True)),
    }


class _Detach(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


# quoted messages that need a situation a test cannot set up cheaply: checked against the source
SOURCE_ONLY = {
    "forward() with a replicated last stage is not supported": "needs three ranks",
    "decoder layer L is cut between stages S and S+1": "needs a Hugging Face model traced (test_generate.py)",
    "do not continue where the previous stage stopped": "needs a Hugging Face model traced (test_generate.py)",
}
# rows quoting one message in pieces
KILLED = ("rank R failed", "rank R was killed by signal SIGKILL")  # its first line, then the next
MISFIT = ("the checkpoint does not fit this model (rank R):", "missing from the checkpoint: ...",
          "unexpected (not in the model): ...", "shape mismatch: ...")


def _checks(row: list[str]) -> list[tuple[str, list[str], list[str]]]:
    """(trigger key, quotes its message must match, exception class names it must have) of a row."""
    quotes = [q for q in row if not CLASS_NAME.fullmatch(q)]
    classes = [q.removeprefix("conveyor.") for q in row if CLASS_NAME.fullmatch(q)]
    if tuple(quotes) in (KILLED, MISFIT):
        return [(" + ".join(quotes), quotes, classes)]
    return [(quote, [quote], classes) for quote in quotes]


CHECKS = [check for row in _rows() for check in _checks(row)]
TRIGGERED = [check for check in CHECKS if check[0] not in SOURCE_ONLY]


def test_every_quoted_message_is_triggered_or_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(CHECKS) > 40
    known = set(_triggers(Path("."), monkeypatch)) | set(SOURCE_ONLY)
    assert [key for key, _, _ in CHECKS if key not in known] == []
    assert len(SOURCE_ONLY) < len(CHECKS) / 6  # triggering is the rule


@pytest.mark.parametrize("check", TRIGGERED, ids=[key[:60] for key, _, _ in TRIGGERED])
def test_quoted_message_is_what_the_code_raises(check: tuple[str, list[str], list[str]], group: None,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key, quotes, classes = check
    error = _raised(_triggers(tmp_path, monkeypatch)[key])
    for quote in quotes:
        assert _pattern(quote).search(str(error)), f"docs/errors.md quotes {quote!r}; the code says:\n{error}"
    for name in classes:  # the error itself, or (under launch) the rank's exception in its traceback
        assert type(error).__name__ == name or f"{name}: " in str(error), f"docs/errors.md names {name}:\n{error}"


def _source_text() -> str:
    """The package's source with adjacent string literals joined, as Python joins them."""
    text = "\n".join(path.read_text() for path in (ROOT / "src" / "conveyor").rglob("*.py"))
    return re.sub(r"""["']\s*\n\s*f?["']""", "", text)


@pytest.mark.parametrize("quote", sorted(SOURCE_ONLY))
def test_quoted_message_is_in_the_source(quote: str) -> None:
    source = _source_text()
    literal = [part.strip() for part in PLACEHOLDER.split(quote) if len(part.strip()) >= 4]
    assert literal
    missing = [part for part in literal if part not in source]
    assert not missing, f"docs/errors.md quotes {quote!r} ({SOURCE_ONLY[quote]}); not in src/conveyor: {missing}"
