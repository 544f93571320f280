"""Checkpoints are partition-agnostic (4 stages -> 2 -> 1 -> plain module -> 4), resume exactly,
survive a crash mid-save, and refuse another model's tensors by name."""

from __future__ import annotations

import json
import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open

import conveyor
from conveyor import checkpoint

import checkpoint_workers as cw
from models import DTYPE, mlp

TIMEOUT = 60


def merged(per_rank: list[dict]) -> dict:
    """Union of the ranks' {"model", "optim", "hyper"} tables."""
    out: dict = {"model": {}, "optim": {}, "hyper": {}}
    for share in per_rank:
        for key in out:
            out[key].update(share[key])
    return out


def assert_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for name in theirs:
        if isinstance(theirs[name], dict):
            assert_identical(ours[name], theirs[name])
        elif isinstance(theirs[name], torch.Tensor):
            assert torch.equal(ours[name], theirs[name]), name
        else:
            assert ours[name] == theirs[name], name


# --- round trip ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("round_trip")
    four, two, one, plain = (str(root / name) for name in ("four", "two", "one", "plain"))
    original = merged(conveyor.launch(cw.train_then_save, 4, args=(four,), timeout=TIMEOUT))
    conveyor.launch(cw.load_then_save, 2, args=(four, two), timeout=TIMEOUT)
    conveyor.launch(cw.load_then_save, 1, args=(two, one), timeout=TIMEOUT)
    model = mlp(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    model.load_state_dict(checkpoint.load_full(one))  # the unsplit model's state_dict, as it is
    checkpoint.load(model, one, optimizer)  # and with the optimizer, matched by name
    checkpoint.save_full(model, plain, optimizer, step=2)
    back = merged(conveyor.launch(cw.load_then_save, 4, args=(plain, None), timeout=TIMEOUT))
    return {"original": original, "back": back, "model": model, "paths": (four, two, one, plain)}


def test_model_tensors_survive_4_to_2_to_1_to_plain_module_and_back_to_4_stages(round_trip: dict) -> None:
    assert_identical(round_trip["back"]["model"], round_trip["original"]["model"])


def test_adam_state_survives_the_round_trip_matched_by_parameter_name(round_trip: dict) -> None:
    assert_identical(round_trip["back"]["optim"], round_trip["original"]["optim"])
    assert {k for state in round_trip["back"]["optim"].values() for k in state} == {"step", "exp_avg", "exp_avg_sq"}


def test_optimizer_hyperparameters_are_restored(round_trip: dict) -> None:
    """The loading optimizers were built with lr=0.5, weight_decay=0; the saved ones had 0.01, 0.1."""
    assert round_trip["back"]["hyper"] == round_trip["original"]["hyper"]
    assert {(h["lr"], h["weight_decay"]) for h in round_trip["back"]["hyper"].values()} == {(0.01, 0.1)}


def test_load_full_gives_the_unsplit_state_dict_from_any_layout(round_trip: dict) -> None:
    for path in round_trip["paths"]:
        full = checkpoint.load_full(path)
        assert list(full) == list(mlp().state_dict())
        assert_identical(full, round_trip["original"]["model"])


def test_manifest_records_step_layout_and_every_tensor(round_trip: dict) -> None:
    four = round_trip["paths"][0]
    manifest = json.loads((Path(four) / "manifest.json").read_text())
    assert manifest["step"] == 2 and manifest["extra"] == {"note": "round trip"}
    assert (manifest["world_size"], manifest["n_stages"]) == (4, 4)
    assert (manifest["schedule"], manifest["n_microbatches"]) == ("1f1b", cw.N_MICROBATCHES)
    assert [(s["stage"], s["rank"], s["names"]) for s in manifest["stages"]] == [
        (i, i, [f"{2 * i}.weight", f"{2 * i}.bias"]) for i in range(4)]
    assert manifest["tensors"]["6.weight"]["shape"] == [6, 6] and manifest["tensors"]["6.bias"]["dtype"] == "float64"
    assert manifest["tensors"]["6.weight"]["file"].endswith("model-00003.safetensors")
    assert set(manifest["optimizer"]["tensors"]) == {f"{n}/{k}" for n in mlp().state_dict()
                                                     for k in ("step", "exp_avg", "exp_avg_sq")}
    assert [r["rng"] for r in manifest["ranks"]] == [["rng/cpu"]] * 4


# --- exact resume -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resume(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    root = str(tmp_path_factory.mktemp("resume"))
    schedules = ["gpipe", "1f1b"]
    straight = conveyor.launch(cw.straight_run, 2, args=(root, schedules), timeout=TIMEOUT)
    resumed = conveyor.launch(cw.resumed_run, 2, args=(root, schedules), timeout=TIMEOUT)
    merge = lambda per_rank: {s: {**per_rank[0][s], **per_rank[1][s]} for s in schedules}  # noqa: E731
    return merge(straight), merge(resumed)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_resuming_from_a_checkpoint_is_bit_identical_to_training_straight(resume: dict, schedule: str) -> None:
    straight, resumed = resume
    assert_identical(resumed[schedule], straight[schedule])


# --- failures while saving ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def failed_save(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[dict]]:
    path = str(tmp_path_factory.mktemp("failed") / "ckpt")
    return path, conveyor.launch(cw.save_then_fail_to_save, 2, args=(path,), timeout=TIMEOUT)


def test_a_write_failing_on_one_rank_raises_on_every_rank_naming_it(failed_save: tuple) -> None:
    _, per_rank = failed_save
    assert per_rank[1]["error"].startswith("OSError") and "No space left" in per_rank[1]["error"]
    assert "failed on rank 1" in per_rank[0]["error"] and "untouched" in per_rank[0]["error"]


def test_a_failed_save_keeps_the_previous_checkpoint_and_removes_its_partial_files(failed_save: tuple) -> None:
    path, per_rank = failed_save
    manifest = checkpoint.read_manifest(path)
    assert manifest["step"] == 1
    assert per_rank[0]["entries"] == sorted(["manifest.json", manifest["data"]])
    assert_identical(checkpoint.load_full(path), merged([r["saved"] for r in per_rank])["model"])


def test_a_crash_mid_save_leaves_the_previous_checkpoint_loadable(failed_save: tuple, tmp_path: Path) -> None:
    """Rank 1 dies (os._exit) half-way through its train file, after rank 0 wrote all of its files."""
    previous, per_rank = failed_save
    path = tmp_path / "ckpt"
    shutil.copytree(previous, path)
    with pytest.raises(conveyor.LaunchError, match="rank 1 exited with code 3"):
        conveyor.launch(cw.load_train_and_crash_while_saving, 2, args=(str(path),), timeout=TIMEOUT)
    manifest = checkpoint.read_manifest(path)
    orphans = [p.name for p in path.iterdir() if p.name.startswith("data-") and p.name != manifest["data"]]
    assert manifest["step"] == 1 and len(orphans) == 1  # the crashed save's files are there, uncommitted
    model = mlp(seed=1)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint.load(model, path, optimizer)
    saved = merged([r["saved"] for r in per_rank])
    assert_identical(model.state_dict(), saved["model"])


# --- mismatches and ties ------------------------------------------------------------------------
def test_a_checkpoint_of_another_model_is_refused_naming_missing_unexpected_and_misshaped(
        tmp_path: Path, one_rank_group: None) -> None:
    torch.manual_seed(0)
    other = nn.Sequential(OrderedDict([
        ("0", nn.Linear(6, 6, dtype=DTYPE)), ("2", nn.Linear(6, 4, dtype=DTYPE)), ("4", nn.Linear(4, 6, dtype=DTYPE)),
        ("9", nn.Linear(6, 6, dtype=DTYPE)),
    ]))
    checkpoint.save_full(other, tmp_path / "other", torch.optim.Adam(other.parameters()))
    runner, optimizer = cw.make_runner(1)
    with pytest.raises(checkpoint.CheckpointError) as caught:
        checkpoint.load(runner, tmp_path / "other", optimizer)
    message = str(caught.value)
    assert "missing from the checkpoint: 6.weight, 6.bias" in message
    assert "unexpected (not in the model): 9.weight, 9.bias" in message
    assert "shape mismatch: 2.weight (checkpoint (4, 6), model (6, 6)), 2.bias (checkpoint (4,), model (6,)), " \
           "4.weight (checkpoint (6, 4), model (6, 6))" in message


def test_a_tied_parameter_is_written_once_by_its_lowest_rank_and_loads_on_every_holder(tmp_path: Path) -> None:
    path = tmp_path / "tied"
    per_rank = conveyor.launch(cw.tied_save_and_reload, 3, args=(str(path),), timeout=TIMEOUT)
    manifest = checkpoint.read_manifest(path)
    def writers(key: str, kind: str) -> list[int]:
        files = [(r, manifest["ranks"][r][kind]) for r in range(3)]
        return [r for r, file in files if file and key in safe_open(str(path / file), "pt").keys()]

    holders, opt_holders = writers("embed.weight", "model"), writers("embed.weight/exp_avg", "train")
    assert holders == [0] and opt_holders == [0]
    assert torch.equal(per_rank[2]["saved"]["model"]["embed.weight"], per_rank[0]["saved"]["model"]["embed.weight"])
    for rank in range(3):
        assert_identical(per_rank[rank]["loaded"], per_rank[rank]["saved"])
    from models import TiedLM

    TiedLM(seed=1).load_state_dict(checkpoint.load_full(path))  # strict: the plain model's names exactly
