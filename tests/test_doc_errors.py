"""Every error message docs/errors.md quotes is what the code says: each is triggered and its text
compared with the quote (placeholders such as ``N``, ``'x'``, ``[...]`` and ``...`` stand for any
value); the two that need three ranks or no process group are looked up in the source instead."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import conveyor
from conveyor.runtime.bundle import flatten
from conveyor.schedule import Schedule, make_schedule
from conveyor.schedule.validate import validate

import workers
from models import batch, mlp, mse

ROOT = Path(__file__).resolve().parents[1]
ERRORS = ROOT / "docs" / "errors.md"
PLACEHOLDER = re.compile(r"\[\.\.\.\]|\.\.\.|<[^>]+>|'[a-z]'|\b(?:[A-Z]|SFM|PATH|i)\b")
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
        # runner construction: the schedule checks run where the runner builds its program
        "unknown schedule 'x'; choose one of [...]": lambda: _one_rank_runner(mlp(), schedule="zigzag"),
        "schedule 'gpipe' places one stage per rank, but the pipe has S stages for R ranks":
            lambda: make_schedule("gpipe", 2, 3, 4),
        "interleaved-1f1b ...": lambda: make_schedule("interleaved-1f1b", 2, 4, 1),
        "zb-v ...": lambda: make_schedule("zb-v", 2, 2, 4),
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
        "receiving activation of stage S from rank R failed: ...": lambda: conveyor.launch(_rank_zero_leaves, 2,
                                                                                           timeout=120),
        "no checkpoint at PATH": lambda: _one_rank_runner(mlp()).load(tmp / "nowhere"),
        "the checkpoint holds X state, not Y": lambda: _checkpoint_of_another_optimizer(tmp),
        # processes
        "rank R failed": lambda: conveyor.launch(_raise_on_rank_zero, 1, timeout=60),
        "job timed out after T s; ranks [...] were still running": lambda: conveyor.launch(_sleep, 1, timeout=1),
        "conveyor.run needs torchrun's environment": lambda: _outside_torchrun(monkeypatch),
    }
    triggers[" + ".join(KILLED)] = lambda: conveyor.launch(_kill_rank_zero, 1, timeout=60)
    return triggers


class _Detach(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.detach()


# quoted messages that need a situation a test cannot set up cheaply: checked against the source
SOURCE_ONLY = {
    "PipelineRunner needs a process group": "this test process holds a process group",
    "forward() with a replicated last stage is not supported": "needs three ranks",
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
