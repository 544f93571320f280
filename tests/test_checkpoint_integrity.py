"""A checkpoint whose files changed after saving never loads silently: every corruption, truncation,
foreign file or path outside its folder is a CheckpointError naming checkpoint and file, and loading
never executes code."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

import conveyor
from conveyor import checkpoint

from models import mlp


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A single-process checkpoint of the 8-layer MLP with Adam state (a model and a train file)."""
    model = mlp()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 6, dtype=torch.float64)).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt"
    checkpoint.save_full(model, path, optimizer, step=1)
    return path


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _edit_manifest(path: Path, edit) -> None:  # noqa: ANN001 - a function of the manifest dict
    manifest = _manifest(path)
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _model_file(path: Path) -> str:
    return _manifest(path)["ranks"][0]["model"]


def _load_into_model(path: Path) -> None:
    model = mlp(seed=1)
    checkpoint.load(model, path, torch.optim.Adam(model.parameters()))


class _Bomb:
    """Unpickling this writes the marker file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (Path.write_text, (self.marker, "code ran"))


def test_the_manifest_holds_a_sha256_of_every_data_file(saved: Path) -> None:
    manifest = _manifest(saved)
    files = {manifest["ranks"][0]["model"], manifest["ranks"][0]["train"]}
    assert set(manifest["checksums"]) == files
    assert all(value.startswith("sha256:") and len(value) == 7 + 64 for value in manifest["checksums"].values())


def test_flipped_bytes_in_a_data_file_are_a_checksum_mismatch_naming_checkpoint_and_file(saved: Path) -> None:
    file = saved / _model_file(saved)
    data = bytearray(file.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    file.write_bytes(bytes(data))
    for load in (lambda: checkpoint.load_full(saved), lambda: _load_into_model(saved)):
        with pytest.raises(conveyor.CheckpointError, match="checksum mismatch") as caught:
            load()
        assert f"checkpoint {saved}" in str(caught.value) and _model_file(saved) in str(caught.value)


def test_a_truncated_data_file_is_a_checkpoint_error(saved: Path) -> None:
    file = saved / _manifest(saved)["ranks"][0]["train"]
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(conveyor.CheckpointError, match="checksum mismatch"):
        _load_into_model(saved)


def test_a_data_file_of_another_checkpoint_is_a_checksum_mismatch(saved: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    checkpoint.save_full(mlp(seed=7), other)
    shutil.copy(other / _model_file(other), saved / _model_file(saved))
    with pytest.raises(conveyor.CheckpointError, match="checksum mismatch"):
        checkpoint.load_full(saved)


def test_a_missing_data_file_is_named(saved: Path) -> None:
    (saved / _model_file(saved)).unlink()
    with pytest.raises(conveyor.CheckpointError, match=r"file .*model-00000\.safetensors.* is missing"):
        checkpoint.load_full(saved)


@pytest.mark.parametrize("outside", ["../outside.safetensors", "/etc/passwd", "data/../../outside.safetensors"])
def test_manifest_paths_outside_the_checkpoint_folder_are_refused(saved: Path, outside: str) -> None:
    shutil.copy(saved / _model_file(saved), saved.parent / "outside.safetensors")
    def point_outside(manifest: dict) -> None:
        for entry in manifest["tensors"].values():
            entry["file"] = outside
        manifest["checksums"][outside] = manifest["checksums"][_model_file(saved)]
    _edit_manifest(saved, point_outside)
    with pytest.raises(conveyor.CheckpointError, match="outside the checkpoint folder"):
        checkpoint.load_full(saved)


def test_a_pickle_bomb_in_place_of_a_data_file_is_refused_without_running(saved: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    (saved / _model_file(saved)).write_bytes(pickle.dumps(_Bomb(marker)))
    with pytest.raises(conveyor.CheckpointError, match="checksum mismatch"):
        _load_into_model(saved)
    assert not marker.exists()


def test_a_manifest_edited_to_name_a_pickle_bomb_never_runs_it(saved: Path, tmp_path: Path) -> None:
    """Even with its checksum written into the manifest, the bomb is read as safetensors (no pickle)."""
    marker = tmp_path / "marker"
    bomb = saved / "bomb.pt"
    torch.save({"weights": _Bomb(marker)}, bomb)
    def point_at_bomb(manifest: dict) -> None:
        for entry in manifest["tensors"].values():
            entry["file"] = "bomb.pt"
        manifest["checksums"]["bomb.pt"] = checkpoint._sha256(bomb)
    _edit_manifest(saved, point_at_bomb)
    with pytest.raises(conveyor.CheckpointError, match=r"file bomb\.pt: cannot be read as safetensors"):
        _load_into_model(saved)
    with pytest.raises(conveyor.CheckpointError, match="cannot be read as safetensors"):
        checkpoint.load_full(saved)
    assert not marker.exists()


def test_a_checkpoint_saved_before_checksums_still_loads_unverified(saved: Path) -> None:
    expected = checkpoint.load_full(saved)
    _edit_manifest(saved, lambda manifest: manifest.pop("checksums"))
    loaded = checkpoint.load_full(saved)
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    _load_into_model(saved)


def test_an_unverified_truncated_file_is_a_checkpoint_error(saved: Path) -> None:
    _edit_manifest(saved, lambda manifest: manifest.pop("checksums"))
    file = saved / _model_file(saved)
    file.write_bytes(file.read_bytes()[:-64])
    with pytest.raises(conveyor.CheckpointError, match=r"model-00000\.safetensors: cannot be read as safetensors"):
        checkpoint.load_full(saved)


def test_an_unverified_foreign_file_names_the_tensor_it_lacks(saved: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    checkpoint.save_full(torch.nn.Linear(2, 2), other)
    _edit_manifest(saved, lambda manifest: manifest.pop("checksums"))
    shutil.copy(other / _model_file(other), saved / _model_file(saved))
    with pytest.raises(conveyor.CheckpointError, match=r"model-00000\.safetensors, tensor 0\.weight: cannot be read"):
        checkpoint.load_full(saved)


def test_a_damaged_manifest_is_a_checkpoint_error(saved: Path) -> None:
    (saved / "manifest.json").write_text('{"format": "conveyor-checkp')
    with pytest.raises(conveyor.CheckpointError, match="the manifest is damaged"):
        checkpoint.load_full(saved)


def test_checkpoint_error_is_exported_from_errors_and_checkpoint() -> None:
    assert conveyor.CheckpointError is conveyor.errors.CheckpointError is checkpoint.CheckpointError


def test_a_manifest_without_the_checksum_of_a_file_it_names_is_damaged(saved: Path) -> None:
    _edit_manifest(saved, lambda manifest: manifest["checksums"].pop(_model_file(saved)))
    with pytest.raises(conveyor.CheckpointError, match="has no checksum in the manifest; the manifest is damaged"):
        checkpoint.load_full(saved)
