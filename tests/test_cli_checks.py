"""``conveyor train`` / ``plan`` / ``demo`` / ``timeline`` refuse bad input before any work, keep only
complete checkpoints, name the pip extra of a missing dependency, and seed user scripts so that a
resumed run equals a straight one bit for bit."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import conveyor
from conveyor import cli_train
from conveyor.cli import main
from conveyor.workloads import WorkloadSpec, load_workload

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py")
SCRIPT = ["train", EXAMPLE, "--stages", "2", "--microbatches", "4"]


@pytest.fixture
def no_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to start processes fails the test: the check must come first."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("conveyor.launch was called")
    monkeypatch.setattr(conveyor, "launch", refuse)


@pytest.mark.parametrize(("argv", "flag", "problem"), [
    (["train", "--microbatches", "0"], "--microbatches", "must be at least 1, got 0"),
    (["train", "--steps", "-5"], "--steps", "must be at least 1, got -5"),
    (["train", "--batch-size", "0"], "--batch-size", "must be at least 1, got 0"),
    (["train", "--stages", "0"], "--stages", "must be at least 1, got 0"),
    (["train", "--keep", "0"], "--keep", "must be at least 1, got 0"),
    (["train", "--chunks", "0"], "--chunks", "must be at least 1, got 0"),
    (["train", "--checkpoint-every", "-1"], "--checkpoint-every", "must be at least 0, got -1"),
    (["train", "--timeout", "0"], "--timeout", "must be greater than 0, got 0"),
    (["train", "--layers", "0"], "--layers", "must be at least 1, got 0"),
    (["train", "--seed", "-1"], "--seed", "must be at least 0, got -1"),
    (["train", "--microbatches", "two"], "--microbatches", "must be a whole number, got 'two'"),
    (["plan", "--ranks", "0"], "--ranks", "must be at least 1, got 0"),
    (["plan", "--top", "0"], "--top", "must be at least 1, got 0"),
    (["plan", "--runs", "0"], "--runs", "must be at least 1, got 0"),
    (["plan", "--memory-per-rank", "0"], "--memory-per-rank", "must be greater than 0, got '0'"),
    (["demo", "--microbatches", "0"], "--microbatches", "must be at least 1, got 0"),
    (["timeline", "--ranks", "0"], "--ranks", "must be at least 1, got 0"),
    (["timeline", "--forward-ms", "-1"], "--forward-ms", "must be at least 0, got -1"),
])
def test_a_bad_numeric_flag_is_an_argparse_error_naming_it(argv: list[str], flag: str, problem: str, no_launch: None,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: {problem}" in capsys.readouterr().err


def test_train_config_refuses_a_zero_batch_size() -> None:
    with pytest.raises(ValueError, match=r"TrainConfig.batch_size must be an integer >= 1, got 0"):
        cli_train.TrainConfig(WorkloadSpec(), batch_size=0)


def test_an_unusable_checkpoint_dir_fails_before_the_first_step(tmp_path: Path, no_launch: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main([*SCRIPT, "--steps", "2", "--checkpoint-dir", str(blocker / "ckpt")]) == 1
    error = capsys.readouterr().err
    assert f"--checkpoint-dir '{blocker / 'ckpt'}' is not usable" in error and "before the first step" in error


def test_the_checkpoint_dir_is_created_before_the_first_step(tmp_path: Path) -> None:
    assert cli_train.check_checkpoint_dir(tmp_path / "new" / "ckpt").is_dir()
    assert list((tmp_path / "new" / "ckpt").iterdir()) == []  # the test file is gone again


def _fake_checkpoint(root: Path, step: int, complete: bool) -> Path:
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True)
    if complete:
        (folder / "manifest.json").write_text("{}")
    return folder


def test_keep_counts_only_complete_checkpoints_and_keeps_the_newest(tmp_path: Path) -> None:
    complete = [_fake_checkpoint(tmp_path, step, True) for step in (2, 4, 6)]
    leftovers = [_fake_checkpoint(tmp_path, step, False) for step in (5, 99)]  # saves killed midway
    cli_train._prune(tmp_path, 1)
    assert [p.exists() for p in complete] == [False, False, True]
    assert all(p.exists() for p in leftovers)
    assert cli_train.latest_checkpoint(tmp_path) == complete[-1]


def test_train_with_keep_1_and_a_leftover_incomplete_folder_keeps_its_checkpoint(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _fake_checkpoint(tmp_path, 999, False)
    assert main([*SCRIPT, "--steps", "2", "--checkpoint-every", "1", "--keep", "1",
                 "--checkpoint-dir", str(tmp_path)]) == 0
    assert f"checkpoint: {tmp_path / 'step-000002'}" in capsys.readouterr().out
    assert not (tmp_path / "step-000001").exists() and (tmp_path / "step-000002" / "manifest.json").is_file()


def test_a_timeline_picture_without_matplotlib_names_the_pip_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_launch: None, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, as if not installed
    assert main(["timeline", "--ranks", "2", "--microbatches", "2", "-o", str(tmp_path / "t.png")]) == 1
    assert "pip install 'conveyor[plot]'" in capsys.readouterr().err
    assert main([*SCRIPT, "--steps", "2", "--timeline", str(tmp_path / "t.png")]) == 1
    assert "--timeline (a picture) needs matplotlib, which is not installed: pip install 'conveyor[plot]'" \
        in capsys.readouterr().err


def test_a_user_script_is_seeded_from_seed_before_building_the_model() -> None:
    def weights(seed: int, caller_seed: int) -> dict:
        torch.manual_seed(caller_seed)  # whatever the caller's random state, --seed decides
        return load_workload(WorkloadSpec(EXAMPLE, seed=seed)).build_model().state_dict()

    first, again, other = weights(3, caller_seed=1), weights(3, caller_seed=2), weights(4, caller_seed=1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def _train_in_a_new_process(*argv: str) -> None:
    """Each run in a process of its own, as from a shell (in one process the runs share a fork
    server, whose random state would hide a missing seed)."""
    import os
    import subprocess

    source = str(Path(conveyor.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": source, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "conveyor.cli", *SCRIPT, *argv], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_user_script_resumed_equals_training_straight_bit_for_bit(tmp_path: Path) -> None:
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    _train_in_a_new_process("--steps", "6", "--checkpoint-dir", str(straight))
    _train_in_a_new_process("--steps", "3", "--checkpoint-dir", str(interrupted))
    _train_in_a_new_process("--steps", "6", "--checkpoint-dir", str(interrupted), "--resume")
    expected = conveyor.load_full(straight / "step-000006")
    resumed = conveyor.load_full(interrupted / "step-000006")
    assert expected.keys() == resumed.keys()
    difference = max((expected[name] - resumed[name]).abs().max().item() for name in expected)
    assert difference == 0.0


def test_drawing_a_timeline_without_matplotlib_names_the_pip_extra(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from conveyor.schedule import simulate

    events = simulate("1f1b", 2, 2).events
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ModuleNotFoundError, match=r"drawing a timeline needs matplotlib, which is not installed: "
                                                  r"pip install 'conveyor\[plot\]'"):
        conveyor.timeline.render(events, tmp_path / "t.png")
