"""The docs cannot rot: every ``python`` and ``bash`` block of README.md and docs/*.md says, in an
HTML comment on the line above it, whether it runs, and every block marked to run is run here (CPU,
small sizes).

Markers (the line just above the opening fence):

- ``<!-- run -->``: a python block is a complete script, run as ``python snippet.py`` in a fresh
  directory; a bash block's commands are run as written, one after the other, in a fresh directory.
- ``<!-- run: CONTEXT -->``: a python fragment, run after the setup named CONTEXT (``CONTEXTS``
  below: the ``model``, ``pipe``, ``x``, ``y`` ... it refers to).
- ``<!-- run: KEY +FLAGS; KEY +FLAGS -->``: a bash command containing KEY runs with FLAGS appended
  (the first rule that matches; argparse keeps an option's last value), so a long command runs at
  smaller sizes while the command itself stays the documented one.
- ``gpu=N`` anywhere in a run marker: the block needs N CUDA devices; it runs only with
  ``CONVEYOR_TEST_CUDA=1`` (tests/test_gpu.py's switch) on a machine that has them.
- ``<!-- skip: REASON -->``: not run, for the reason given.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*(run|skip)\s*(?::\s*(.*?))?\s*-->", re.DOTALL)
FENCE = re.compile(r"^(\s*)```(\w*)\s*$")


@dataclass
class Block:
    path: Path
    line: int          # of the opening fence, 1-based
    language: str
    code: str
    marker: str | None  # "run", "skip" or None
    argument: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def _comment_above(lines: list[str], index: int) -> str:
    """The HTML comment (possibly over several lines) just above line ``index``, or ''."""
    end = next((j for j in range(index - 1, -1, -1) if lines[j].strip()), None)
    if end is None or not lines[end].rstrip().endswith("-->"):
        return ""
    start = next((j for j in range(end, -1, -1) if "<!--" in lines[j]), end)
    return " ".join(line.strip() for line in lines[start:end + 1])


def _blocks(path: Path) -> list[Block]:
    lines = path.read_text().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        indent, language = opening.group(1), opening.group(2)
        end = index + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        code = textwrap.dedent("\n".join(line.removeprefix(indent) for line in lines[index + 1:end])) + "\n"
        marker = MARKER.fullmatch(_comment_above(lines, index))
        blocks.append(Block(path, index + 1, language, code, marker.group(1) if marker else None,
                            (marker.group(2) or "") if marker else ""))
        index = end + 1
    return blocks


BLOCKS = [block for path in DOCS for block in _blocks(path) if block.language in ("python", "bash")]
RUN = [block for block in BLOCKS if block.marker == "run"]


def test_every_python_and_bash_block_says_whether_it_runs() -> None:
    unmarked = [block.name for block in BLOCKS if block.marker is None]
    assert not unmarked, f"add <!-- run ... --> or <!-- skip: reason --> above these blocks: {unmarked}"
    reasonless = [block.name for block in BLOCKS if block.marker == "skip" and not block.argument]
    assert not reasonless, f"say why these blocks are not run: {reasonless}"


# --- python fragments: what they refer to ---------------------------------------------------------
_MLP = '''
import torch
import torch.nn as nn

import conveyor


def build_model(width: int = 8, layers: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(layers)])


def make_batches(n: int = 4, rows: int = 8, width: int = 8) -> list:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(rows, width, generator=generator), torch.randn(rows, width, generator=generator))
            for _ in range(n)]


loss_fn = loss = nn.functional.mse_loss


def log(value) -> None:
    print("loss", float(value))
'''

_RANK = '''
model = build_model()
pipe = conveyor.pipeline(model, n_stages=world_size)
batches = make_batches()
x, y = batches[0]
'''

_RUNNER = _RANK + '''
runner = conveyor.PipelineRunner(pipe, schedule="1f1b", n_microbatches=2, loss_fn=loss_fn)
optimizer = torch.optim.AdamW(runner.parameters(), lr=1e-3)
step = 0
'''

_GPT2 = '''
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import conveyor

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=9, n_embd=32, n_head=2, vocab_size=128, n_positions=32,
                                   use_cache=False)).eval()
ids = torch.randint(0, 128, (2, 16))
mask = torch.ones(2, 16, dtype=torch.long)
x = ids
'''

_LOCAL = _MLP + '''
world_size = 4
model = build_model()
pipe = conveyor.pipeline(model, n_stages=world_size)
x, y = make_batches(rows=16)[0]
'''

# name -> (where it runs, setup); "ranks N": the setup and the fragment are the body of
# fn(rank, world_size) under conveyor.launch(fn, N) (module-level part before "|||")
CONTEXTS: dict[str, tuple[str, str]] = {
    "ranks 2": ("ranks 2", _MLP + "|||" + _RANK),
    "runner on 1 rank": ("ranks 1", _MLP + "|||" + _RUNNER),
    "fp16 runner on 1 rank": ("ranks 1", _MLP + "|||" + _RUNNER.replace("loss_fn=loss_fn)",
                                                                      "loss_fn=loss_fn, precision='fp16')")),
    "local": ("process", _LOCAL),
    "gpt2": ("process", _GPT2),
}


def _environment() -> dict[str, str]:
    source = str(ROOT / "src")
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": source + (os.pathsep + path if path else ""), "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo"}


def _run_script(text: str, where: Path, name: str) -> None:
    script = where / "snippet.py"
    script.write_text(text)
    result = subprocess.run([sys.executable, str(script)], cwd=where, env=_environment(), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


def _context(block: Block) -> tuple[str, str]:
    return CONTEXTS[block.argument.split(" gpu=")[0].strip()]


def _fragment_script(block: Block) -> str:
    """A script running the fragment on ranks: its imports first, then the setup, then the rest."""
    kind, setup = _context(block)
    n_ranks = int(kind.split()[1])
    module, body = setup.split("|||")
    lines = block.code.splitlines()
    imports = [line for line in lines if line.startswith(("import ", "from "))]
    rest = [line for line in lines if line not in imports]
    body = "\n".join(["torch.set_num_threads(1)", *imports, body, *rest])
    return (module + "\n\ndef _body(rank: int, world_size: int) -> None:\n" + textwrap.indent(body, "    ")
            + f"\n\nif __name__ == '__main__':\n    conveyor.launch(_body, {n_ranks}, timeout=240)\n")


def _run_in_process(block: Block, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fragment that needs no process group: its setup and itself, executed here."""
    monkeypatch.chdir(where)
    namespace: dict = {"__name__": "doc_snippet"}
    exec(compile(_context(block)[1], f"{block.name} (setup)", "exec"), namespace)  # noqa: S102
    exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102


# --- bash: conveyor commands, in this process -------------------------------------------------------
def _commands(code: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        command = re.split(r"\s#\s|\s#$", line, maxsplit=1)[0].strip()  # drop the trailing comment
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def _with_flags(command: str, rules: str) -> tuple[list[str], str | None]:
    """The command's argv with the marker's smaller flags appended, and the file ``>`` writes to."""
    command, _, redirect = command.partition(" > ")
    argv = shlex.split(command)
    for rule in filter(None, (r.strip() for r in rules.split(";"))):
        prefix, _, flags = rule.partition("+")
        if prefix.strip() in command:
            argv += shlex.split(flags)
            break
    return argv, redirect.strip() or None


_RAN: set[tuple[str, ...]] = set()  # commands already run by an earlier block (several docs show the same)
_STATEFUL = ("--checkpoint-dir", "--resume", "--profile", "--save-profile", "-o", "--timeline")


def _run_commands(block: Block, where: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.cli import main

    for name in ("examples", "bench"):
        (where / name).symlink_to(ROOT / name)
    monkeypatch.chdir(where)
    for command in _commands(block.code):
        argv, redirect = _with_flags(command, block.argument)
        assert argv[0] == "conveyor", f"{block.name}: only conveyor commands can be run here: {command}"
        stateless = redirect is None and not any(flag in argv for flag in _STATEFUL)
        if stateless and tuple(argv) in _RAN:
            continue
        output = io.StringIO()
        with contextlib.redirect_stdout(output if redirect else sys.stdout):
            code = main(argv[1:])
        assert code == 0, f"{block.name}: {' '.join(argv)} exited with {code}"
        if redirect:
            (where / redirect).write_text(output.getvalue())
        if stateless:
            _RAN.add(tuple(argv))


def _gpus_needed(block: Block) -> int:
    found = re.search(r"gpu=(\d+)", block.argument)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("block", RUN, ids=[block.name for block in RUN])
def test_documented_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = _gpus_needed(block)
    if gpus and (os.environ.get("CONVEYOR_TEST_CUDA") != "1" or torch.cuda.device_count() < gpus):
        pytest.skip(f"needs {gpus} CUDA device(s) and CONVEYOR_TEST_CUDA=1")
    if block.language == "bash":
        _run_commands(block, tmp_path, monkeypatch)
    elif block.argument.split(" gpu=")[0].strip() and _context(block)[0] == "process":
        _run_in_process(block, tmp_path, monkeypatch)
    elif block.argument.split(" gpu=")[0].strip():
        _run_script(_fragment_script(block), tmp_path, block.name)
    else:
        _run_script(block.code, tmp_path, block.name)
