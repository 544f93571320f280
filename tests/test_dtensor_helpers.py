"""Helpers that understand DTensors: ``clip_grad_norm_`` gives the unsplit model's norm and
clipped gradients on sharded stages (FSDP2, tensor parallel, both, and replicated stages), and a
checkpoint written by pp2 x dp2 x tp2 (FSDP2 + TP) loads bit-identically, optimizer state
included, into the same layout, pp4, pp2 x dp2 with FSDP2, one process and the unsplit model.

Two launches: the 8-rank writer, then 4 ranks that clip and load what it wrote.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import conveyor
from conveyor import checkpoint

import dtensor_workers
from dtensor_workers import TRAINED, adam_of, reference_clipped
from mesh_workers import global_batch
from mesh_workers import reference as trained_reference
from models import mlp, mse


@pytest.fixture(scope="module")
def reference() -> dict:
    return reference_clipped()


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    path = tmp_path_factory.mktemp("dtensor") / "ckpt"
    return path, conveyor.launch(dtensor_workers.save_3d, 8, args=(str(path),), timeout=300)


@pytest.fixture(scope="module")
def four(written: tuple[Path, list[dict]]) -> list[dict]:
    return conveyor.launch(dtensor_workers.four_ranks, 4, args=(str(written[0]),), timeout=300)


def _saved(written: tuple[Path, list[dict]]) -> dict:
    """The 3-D job's weights and Adam state after TRAINED steps, merged over its ranks."""
    out: dict = {"model": {}, "optim": {}}
    for rank_result in written[1]:
        for key in out:
            out[key].update(rank_result["saved"][key])
    return out


def _assert_identical(ours: dict, theirs: dict, where: str) -> None:
    assert ours.keys() == theirs.keys(), where
    for name, value in theirs.items():
        if isinstance(value, dict):
            _assert_identical(ours[name], value, f"{where} {name}")
        else:
            assert torch.equal(ours[name], value), f"{where} {name}"


def _assert_clipped_like_the_unsplit_model(results: list[dict], reference: dict, label: str) -> None:
    covered = set()
    for rank, result in enumerate(results):
        assert result["inf"].shape == () and result["two"].shape == (), label
        torch.testing.assert_close(result["inf"], reference["inf"], rtol=0, atol=1e-10, msg=f"{label} inf rank {rank}")
        torch.testing.assert_close(result["two"], reference["two"], rtol=0, atol=1e-10, msg=f"{label} 2 rank {rank}")
        assert torch.equal(result["two"], results[0]["two"]) and torch.equal(result["inf"], results[0]["inf"])
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, reference["grads"][name], rtol=0, atol=1e-10, msg=f"{label} {name}")
            covered.add(name)
    assert covered == set(reference["grads"]), label


def test_the_norm_over_fsdp2_and_tensor_parallel_shards_on_pp2_dp2_tp2_is_the_unsplit_models(
        written: tuple[Path, list[dict]], reference: dict) -> None:
    _assert_clipped_like_the_unsplit_model([r["clipped"] for r in written[1]], reference, "pp2xdp2xtp2")


def test_the_norm_over_hsdp_shards_and_replicas_is_the_unsplit_models(written: tuple[Path, list[dict]],
                                                                     reference: dict) -> None:
    """pp2 x dp_replicate2 x dp_shard2: each gradient sharded over dp_shard, replicated over dp_replicate."""
    _assert_clipped_like_the_unsplit_model([r["hsdp"] for r in written[1]], reference, "hsdp")


@pytest.mark.parametrize("label", ["pp2xdp2-fsdp", "pp2xdp2-ddp", "pp2xtp2", "replicas"])
def test_the_norm_over_sharded_or_replicated_stages_is_the_unsplit_models(four: list[dict], reference: dict,
                                                                          label: str) -> None:
    """pp2 x dp2 with FSDP2 and with DDP (plain copies counted once), pp2 x tp2 (Colwise/Rowwise),
    replicas=[2, 2] (each stage counted once)."""
    _assert_clipped_like_the_unsplit_model([r[label] for r in four], reference, label)


def test_replicated_stages_of_a_pipeline_on_part_of_the_job_clip_like_the_unsplit_model(four: list[dict],
                                                                                        reference: dict) -> None:
    """replicas=[2, 1] on a group of 3 of the job's 4 ranks (the replicas then sum point to point)."""
    _assert_clipped_like_the_unsplit_model([r["replicas-subgroup"] for r in four[:3]], reference, "subgroup")


def test_replicated_stages_sum_gradients_with_one_all_reduce_over_their_group_per_step(four: list[dict]) -> None:
    """replicas=[2, 2]: per step, the first stage's replicas all-reduce their gradients once (one
    bucket); the last stage's also sum the loss."""
    steps = TRAINED + 1
    assert [r["replica all-reduces"] for r in four] == [steps, steps, 2 * steps, 2 * steps]


def test_a_3d_checkpoint_is_the_unsplit_models_weights_and_adam_state(written: tuple[Path, list[dict]],
                                                                      reference: dict) -> None:
    path, _ = written
    saved = _saved(written)
    state = conveyor.load_full(path)
    _assert_identical(state, saved["model"], "load_full")
    torch.testing.assert_close(state, reference["weights"], rtol=0, atol=1e-10)
    model = mlp(seed=3)
    optimizer = adam_of(model)
    manifest = checkpoint.load(model, path, optimizer)
    assert manifest["step"] == TRAINED and manifest["world_size"] == 8 and manifest["n_stages"] == 2
    assert manifest["mesh"] == {"dims": ["pp", "dp", "tp"], "shape": [2, 2, 2]}
    names = {id(p): n for n, p in model.named_parameters()}
    _assert_identical({n: v for n, v in model.state_dict().items()}, saved["model"], "unsplit model")
    _assert_identical({names[id(p)]: s for p, s in optimizer.state.items()}, saved["optim"], "unsplit Adam")
    assert optimizer.param_groups[0]["lr"] == 0.01


def test_each_tensor_of_a_3d_checkpoint_is_written_by_one_rank_and_every_file_has_a_checksum(
        written: tuple[Path, list[dict]]) -> None:
    path, _ = written
    manifest = checkpoint.read_manifest(path)
    counts: dict[str, int] = {}
    for file in sorted(path.glob(f"{manifest['data']}/*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                if not key.startswith("rng/"):  # every rank's own random state
                    counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(manifest["tensors"]) | set(manifest["optimizer"]["tensors"])
    assert all(count == 1 for count in counts.values()), counts
    written_files = {f"{manifest['data']}/{file.name}" for file in path.glob(f"{manifest['data']}/*.safetensors")}
    assert set(manifest["checksums"]) == written_files  # every file verified on load


def test_a_3d_checkpoint_loads_into_the_same_layout_pp4_and_pp2_dp2_fsdp2_bit_identically(
        written: tuple[Path, list[dict]], four: list[dict]) -> None:
    saved = _saved(written)
    for label, per_rank in (("pp2xdp2xtp2", [r["reloaded"] for r in written[1]]),
                            ("pp4", [r["loaded-pp4"] for r in four]),
                            ("pp2xdp2-fsdp", [r["loaded-pp2xdp2-fsdp"] for r in four])):
        merged: dict = {"model": {}, "optim": {}}
        for rank_result in per_rank:
            for key in merged:
                for name, value in rank_result[key].items():
                    if name in merged[key]:  # every holder of a name (data/tensor-parallel peers) holds the same
                        _assert_identical({name: value}, {name: merged[key][name]}, f"{label} peers")
                    merged[key][name] = value
        _assert_identical(merged, saved, label)


@pytest.mark.parametrize("label", ["pp4", "pp2xdp2-fsdp"])
def test_training_resumed_from_a_3d_checkpoint_continues_like_the_unsplit_model(four: list[dict], label: str) -> None:
    """The loaded weights and Adam moments (as DTensor shards under FSDP2) take the next step."""
    expected, _ = trained_reference(steps=TRAINED + 1)
    covered = set()
    for rank_result in four:
        for name, tensor in rank_result[f"trained-{label}"].items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-10, msg=f"{label} {name}")
            covered.add(name)
    assert covered == set(expected)


def test_a_3d_checkpoint_loads_into_a_local_pipeline_and_trains_on(written: tuple[Path, list[dict]]) -> None:
    path, _ = written
    pipeline = conveyor.LocalPipeline(conveyor.pipeline(mlp(seed=3), n_stages=2), schedule="1f1b",
                                      n_microbatches=4, loss_fn=mse)
    optimizer = torch.optim.Adam(pipeline.parameters(), lr=0.5)
    checkpoint.load(pipeline, path, optimizer)
    _assert_identical(pipeline.state_dict(), _saved(written)["model"], "LocalPipeline")
    x, y = global_batch(TRAINED)
    pipeline.step(x, target=y)
    grads = {name: p.grad for name, p in pipeline.named_parameters()}
    model = mlp()
    model.load_state_dict(conveyor.load_full(path))
    mse(model(x), y).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-10, msg=name)
