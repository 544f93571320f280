"""The ``conveyor`` command: each subcommand runs (tiny sizes, 2 ranks, a few steps), errors are one
line, and ``train --resume`` continues bit-identically."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch

import conveyor
from conveyor.cli import main

TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "16", "--batch-size", "8"]
TRAIN = ["train", "demo", *TINY, "--stages", "2", "--microbatches", "2"]


@pytest.mark.parametrize("command", ["demo", "train", "plan", "bench", "timeline"])
def test_every_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: conveyor {command}" in capsys.readouterr().out


def test_plan_prints_a_table_and_its_reasons(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--top", "4"]) == 0
    out = capsys.readouterr().out
    assert "samples/s" in out and "Choice:" in out and "memory: rank" in out


def test_plan_json_lists_candidates_with_predictions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--json", "--no-calibrate"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["n_ranks"] == 2 and data["candidates"][0]["step_s"] > 0


def test_plan_prices_candidates_with_in_stream_factors_from_a_traced_run_unless_told_not_to(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--json"]) == 0
    factors = json.loads(capsys.readouterr().out)["in_stream"]
    assert set(factors) == {"F", "B", "U"} and all(value > 0 for value in factors.values())
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--json", "--no-calibrate"]) == 0
    assert json.loads(capsys.readouterr().out)["in_stream"] == {}


def test_plan_verify_runs_the_top_runnable_candidate(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--top", "1", "--verify",
                 "--runnable-only", "--steps", "1", "--timeout", "60"]) == 0
    verified = capsys.readouterr().out.split("local processes ...")[1]
    assert "predicted ms" in verified and "%" in verified.splitlines()[-1]


def test_plan_a_script_on_more_ranks_than_cores_profiles_and_verifies_it(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # 4 ranks on 2 cores: the profile is taken by 4 processes at once, each importing the script itself
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    script = str(Path(__file__).parent / "helpers" / "plan_script.py")
    assert main(["plan", script, "--ranks", "4", "--no-link", "--runs", "1", "--top", "1", "--verify",
                 "--runnable-only", "--steps", "1", "--timeout", "120"]) == 0
    out = capsys.readouterr().out
    assert "timed by 4 processes at once" in out
    # ranks sharing cores: the optimizer step and the sharing's stretch are calibrated, not F and B
    assert "inside a pipeline (a traced 1F1B run): U x" in out and "S x" in out and "F x" not in out
    assert "%" in out.split("local processes ...")[1].splitlines()[-1]


def test_plan_json_with_verify_carries_each_measured_step_and_its_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--top", "1", "--verify", "--json",
                 "--schedules", "1f1b", "--steps", "1", "--timeout", "120"]) == 0
    data = json.loads(capsys.readouterr().out)
    [verified] = data["verified"]
    assert verified["label"] == data["candidates"][0]["label"] and verified["measured_step_s"] > 0
    predicted, measured = verified["predicted_step_s"], verified["measured_step_s"]
    assert verified["error"] == pytest.approx((predicted - measured) / measured)


def test_plan_schedules_option_restricts_the_search(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", *TINY, "--ranks", "2", "--no-link", "--runs", "1", "--json", "--no-calibrate",
                 "--schedules", "gpipe,pipedream"]) == 0
    names = {c["schedule"] for c in json.loads(capsys.readouterr().out)["candidates"]}
    assert names == {"gpipe", "pipedream"}


def test_plan_schedules_option_names_the_known_schedules_when_given_another(
        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["plan", "--schedules", "1f1b,nonesuch"])
    assert "unknown schedules ['nonesuch']" in capsys.readouterr().err


GPT2_TINY = ["gpt2", "--layers", "2", "--width", "32", "--heads", "2", "--seq-len", "8", "--batch-size", "4"]


def test_plan_gpt2_verify_runnable_only_skips_schedules_its_tied_weights_forbid(
        capsys: pytest.CaptureFixture[str]) -> None:
    # GPT-2 ties wte to lm_head across the stages: PipeDream would update the copies apart
    assert main(["plan", *GPT2_TINY, "--ranks", "2", "--no-link", "--runs", "1", "--top", "2", "--verify",
                 "--runnable-only", "--schedules", "pipedream,1f1b", "--steps", "1", "--timeout", "120",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pipedream = [c for c in data["candidates"] if c["schedule"] == "pipedream"]
    assert pipedream and not any(c["runnable"] for c in pipedream)
    assert "tied weights" in pipedream[0]["refusal"]
    assert [v["schedule"] for v in data["verified"]] == ["1f1b", "1f1b"]
    assert all(v["measured_step_s"] > 0 for v in data["verified"])


def test_train_gpt2_with_plan_trains_the_top_runnable_choice(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", *GPT2_TINY, "--stages", "2", "--plan", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "plan: " in out and "pipedream" not in out.split("plan: ")[1].splitlines()[0] and "loss" in out


def test_train_with_plan_draws_a_timeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    picture = tmp_path / "timeline.png"
    assert main([*TRAIN, "--steps", "2", "--plan", "--timeline", str(picture)]) == 0
    out = capsys.readouterr().out
    assert "plan: " in out and "loss" in out and picture.stat().st_size > 0


def _straight_and_resumed(tmp_path: Path, command: list[str]) -> tuple[Path, Path]:
    """Train 4 steps straight, and 2 steps then --resume to 4; return both checkpoint dirs."""
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main([*command, "--steps", "4", "--checkpoint-dir", str(straight)]) == 0
    assert main([*command, "--steps", "2", "--checkpoint-dir", str(interrupted)]) == 0
    assert main([*command, "--steps", "4", "--checkpoint-dir", str(interrupted), "--resume"]) == 0
    return straight, interrupted


def test_train_resumed_after_two_steps_equals_four_steps_straight(tmp_path: Path) -> None:
    straight, interrupted = _straight_and_resumed(tmp_path, TRAIN)
    expected = conveyor.load_full(straight / "step-000004")
    resumed = conveyor.load_full(interrupted / "step-000004")
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)
    after_two = conveyor.load_full(interrupted / "step-000002")
    assert not all(torch.equal(expected[name], after_two[name]) for name in expected)  # it did train on


def test_pipedream_train_resumed_equals_the_straight_run_that_drains_at_the_same_step(tmp_path: Path) -> None:
    """Asynchronous training streams chunks of --checkpoint-every batches, draining at each save."""
    straight, interrupted = _straight_and_resumed(
        tmp_path, [*TRAIN, "--schedule", "pipedream", "--checkpoint-every", "2"])
    expected = conveyor.load_full(straight / "step-000004")
    resumed = conveyor.load_full(interrupted / "step-000004")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_train_runs_a_user_script(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[1] / "examples" / "train_mlp.py"
    assert main(["train", str(example), "--stages", "2", "--microbatches", "2", "--steps", "2",
                 "--checkpoint-dir", str(tmp_path)]) == 0
    assert "loss" in capsys.readouterr().out and (tmp_path / "step-000002" / "manifest.json").is_file()


def test_resume_without_a_checkpoint_is_one_readable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*TRAIN, "--steps", "2", "--checkpoint-dir", str(tmp_path / "none"), "--resume"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no checkpoint" in error and "Traceback" not in error


def test_unknown_model_source_is_one_readable_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "no_such_model_xyz", "--no-link"]) == 1
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "no_such_model_xyz" in error


def test_bench_passes_its_flags_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("bench.__main__")
    fake.main = lambda argv: seen.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.__main__", fake)
    assert main(["bench", "--quick", "--only", "overhead", "memory"]) == 0
    assert seen == [["--quick", "--only", "overhead", "memory"]]


def test_bench_without_the_repository_says_so(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "bench.__main__", None)  # import fails as if bench/ were absent
    assert main(["bench", "--quick"]) == 1
    assert "not importable" in capsys.readouterr().err


def test_timeline_picture_without_matplotlib_names_the_plot_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if matplotlib were not installed
    assert main(["timeline", "--ranks", "2", "--microbatches", "2", "-o", str(tmp_path / "t.png")]) == 1
    error = capsys.readouterr().err
    assert "pip install 'conveyor[plot]'" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "t.png").exists()


def test_demo_and_timeline_still_run(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["timeline", "--ranks", "2", "--microbatches", "2"]) == 0
    assert main(["demo", "--stages", "2", "--steps", "2", "--batch-size", "4", "--microbatches", "2"]) == 0
    out = capsys.readouterr().out
    assert "simulated bubble" in out and "validation loss" in out


def test_demo_resumed_after_one_step_equals_two_steps_straight(tmp_path: Path) -> None:
    demo = ["demo", "--stages", "2", "--batch-size", "4", "--microbatches", "2"]
    assert main([*demo, "--steps", "2", "--checkpoint-dir", str(tmp_path / "straight")]) == 0
    assert main([*demo, "--steps", "1", "--checkpoint-dir", str(tmp_path / "resumed")]) == 0
    assert main([*demo, "--steps", "2", "--checkpoint-dir", str(tmp_path / "resumed"), "--resume"]) == 0
    expected = conveyor.load_full(tmp_path / "straight" / "step-000002")
    resumed = conveyor.load_full(tmp_path / "resumed" / "step-000002")
    assert all(torch.equal(expected[name], resumed[name]) for name in expected)


def test_train_under_torchrun_joins_its_job(tmp_path: Path) -> None:
    import os
    import subprocess

    source = str(Path(conveyor.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": source, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "conveyor.cli", *TRAIN, "--steps", "2", "--checkpoint-dir", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "step-000002" / "manifest.json").is_file() and "loss" in result.stdout


def test_a_rank_whose_stages_hold_no_parameters_gets_an_optimizer_that_updates_nothing() -> None:
    from conveyor.workloads import WorkloadSpec, load_workload

    workload = load_workload(WorkloadSpec(str(Path(__file__).parent / "helpers" / "plan_script.py")))
    optimizer = workload.optimizer_for(iter(nn_relu_parameters()))
    optimizer.step()  # torch's own optimizers refuse an empty list; this one steps nothing
    assert all(p.numel() == 0 for group in optimizer.param_groups for p in group["params"])


def nn_relu_parameters() -> list[torch.nn.Parameter]:
    return list(torch.nn.ReLU().parameters())
