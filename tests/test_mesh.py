"""Pipelines on a device mesh: stages wrapped by FSDP2, DDP, composable replicate and tensor
parallelism train exactly like the unsplit model on the whole batch (float64, atol 1e-10, weights
after 3 Adam steps) under every synchronous schedule, each data-parallel replica feeding its own
uneven shard; data-parallel sync happens once per stage per step; what cannot run is refused.

Run everything, the slow 8-rank matrix included: ``pytest -m "slow or not slow" tests/test_mesh.py``.
"""

from __future__ import annotations

import pytest
import torch

import conveyor

import mesh_workers
from mesh_workers import reference

SCHEDULES = ["gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v"]
DP_KINDS = ["fsdp", "fsdp-keep", "ddp", "replicate", "replicate-ddp", "plain"]


def _cases(kinds: list[str], schedules: list[str] = SCHEDULES) -> list[tuple[str, str, bool]]:
    return [(schedule, kind, recompute) for schedule in schedules for kind in kinds for recompute in (False, True)]


def _assert_exact(per_rank: list[dict], case: tuple, last_stage_ranks: list[int]) -> None:
    """Every rank's weights equal the unsplit model's (names included); the last stage's ranks
    return the global mean loss of every step."""
    expected, losses = reference(model=mesh_workers.NamedNet() if case[3:] == ("named",) else None)
    covered = set()
    for rank_result in per_rank:
        result = rank_result[case]
        assert set(result["names"]) <= set(expected), result["names"]
        for name, tensor in result["weights"].items():
            torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-10, msg=f"{case} {name}")
            covered.add(name)
    assert covered == set(expected)
    for rank in last_stage_ranks:
        got = torch.stack(per_rank[rank][case]["losses"])
        torch.testing.assert_close(got, torch.stack(losses), rtol=0, atol=1e-10, msg=f"{case} losses")


@pytest.fixture(scope="module")
def pp2_dp2() -> list[dict]:
    cases = _cases(DP_KINDS) + _cases(["fsdp-ac"], ["1f1b", "zb-h1"]) + [("1f1b", "fsdp", False, "meta")]
    cases += [(schedule, kind, False, "named") for schedule in ("1f1b", "zb-h1") for kind in ("fsdp-root", "ddp")]
    return conveyor.launch(mesh_workers.matrix, 4, args=({"pp": 2, "dp": 2}, cases), timeout=300)


@pytest.fixture(scope="module")
def pp2_tp2() -> list[dict]:
    return conveyor.launch(mesh_workers.matrix, 4, args=({"pp": 2, "tp": 2}, _cases(["tp"])), timeout=300)


@pytest.mark.parametrize("kind", DP_KINDS)
def test_pp2_dp2_stages_train_exactly_like_the_unsplit_model_under_every_schedule(pp2_dp2: list[dict],
                                                                                  kind: str) -> None:
    """fsdp: fully_shard per Linear and on the stage; fsdp-keep: reshard_after_forward=False;
    ddp: DistributedDataParallel on mesh['dp']; replicate: the FSDP-based composable replicate;
    replicate-ddp: the DDP-based one; plain: no wrapper, conveyor all-reduces over 'dp'."""
    for schedule, case_kind, recompute in _cases([kind]):
        last = [0, 1] if schedule == "zb-v" else [2, 3]  # zb-v's V puts the last stage on pp rank 0
        _assert_exact(pp2_dp2, (schedule, case_kind, recompute), last)


def test_parallelize_gets_each_materialised_stage_once_with_its_layer_names_and_the_whole_mesh(
        pp2_dp2: list[dict]) -> None:
    first = pp2_dp2[0][("1f1b", "fsdp", False)]["calls"]
    assert first == [(["0", "1", "2", "3"], True)]
    looped = pp2_dp2[0][("interleaved-1f1b", "fsdp", False)]["calls"]
    assert looped == [(["0", "1"], True), (["4", "5"], True)]  # stages 0 and 2 of 4


def test_activation_checkpointed_fsdp2_layers_keep_the_unsplit_names_and_train_exactly(pp2_dp2: list[dict]) -> None:
    """checkpoint_wrapper per layer, then fully_shard (torchtitan's order), also under split backward."""
    for case in _cases(["fsdp-ac"], ["1f1b", "zb-h1"]):
        _assert_exact(pp2_dp2, case, [2, 3])


def test_a_traced_model_with_named_children_keeps_them_for_parallelize_and_trains_exactly(
        pp2_dp2: list[dict]) -> None:
    for schedule in ("1f1b", "zb-h1"):
        for kind in ("fsdp-root", "ddp"):
            case = (schedule, kind, False, "named")
            assert [names for names, _ in pp2_dp2[2][case]["calls"]] == [["blocks", "out"]]
            _assert_exact(pp2_dp2, case, [2, 3])


def test_a_meta_device_model_is_materialised_before_parallelize_and_trains_exactly(pp2_dp2: list[dict]) -> None:
    _assert_exact(pp2_dp2, ("1f1b", "fsdp", False, "meta"), [2, 3])


def test_pp2_tp2_colwise_rowwise_stages_train_exactly_under_every_schedule(pp2_tp2: list[dict]) -> None:
    for case in _cases(["tp"]):
        last = [0, 1] if case[0] == "zb-v" else [2, 3]
        _assert_exact(pp2_tp2, case, last)


def test_pp2_dp2_tp2_fsdp_and_tensor_parallel_stages_train_exactly_under_zb_h1() -> None:
    """The default slice of the 8-rank matrix (the rest is marked slow)."""
    case = ("zb-h1", "fsdp", False)
    per_rank = conveyor.launch(mesh_workers.matrix, 8, args=({"pp": 2, "dp": 2, "tp": 2}, [case]), timeout=300)
    _assert_exact(per_rank, case, [4, 5, 6, 7])


@pytest.mark.slow
def test_pp2_dp2_tp2_fsdp_and_tensor_parallel_stages_train_exactly_under_every_schedule() -> None:
    cases = _cases(["fsdp", "fsdp-keep", "plain"])  # plain: tensor parallel, conveyor all-reduces over dp
    per_rank = conveyor.launch(mesh_workers.matrix, 8, args=({"pp": 2, "dp": 2, "tp": 2}, cases), timeout=600)
    for case in cases:
        _assert_exact(per_rank, case, [0, 1, 2, 3] if case[0] == "zb-v" else [4, 5, 6, 7])


@pytest.mark.slow
def test_hsdp_stages_on_a_2d_data_mesh_train_exactly_under_every_schedule() -> None:
    cases = _cases(["hsdp"])
    per_rank = conveyor.launch(mesh_workers.matrix, 8, args=({"pp": 2, "dp_replicate": 2, "dp_shard": 2}, cases),
                               timeout=600)
    for case in cases:
        _assert_exact(per_rank, case, [0, 1, 2, 3] if case[0] == "zb-v" else [4, 5, 6, 7])


# --- collectives ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def collective_counts() -> list[dict]:
    return conveyor.launch(mesh_workers.collective_counts, 4, args=(["gpipe", "1f1b", "zb-h1"],), timeout=300)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_fsdp2_stages_reduce_scatter_once_per_parameter_group_per_step(collective_counts: list[dict],
                                                                       schedule: str) -> None:
    """Each stage holds two fully_shard units (one per Linear): 2 reduce-scatters per step for
    4 micro-batches, with reshard_after_forward True and False."""
    for rank_counts in collective_counts:
        assert rank_counts[("ours", "fsdp", schedule)]["reduce_scatter"] == 2
        assert rank_counts[("ours", "fsdp-keep", schedule)]["reduce_scatter"] == 2


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_fsdp2_stages_all_gather_no_more_than_torch_pipeline_stage(collective_counts: list[dict],
                                                                   schedule: str) -> None:
    for rank_counts in collective_counts:
        ours = rank_counts[("ours", "fsdp", schedule)]["all_gather"]
        assert 0 < ours <= rank_counts[("torch", "fsdp", schedule)]["all_gather"]
        assert rank_counts[("ours", "fsdp-keep", schedule)]["all_gather"] == 2  # one per unit, then kept


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_ddp_stages_all_reduce_one_bucket_pass_per_step(collective_counts: list[dict], schedule: str) -> None:
    """The tiny stage fits one DDP bucket: one all-reduce per step, not one per micro-batch."""
    for rank_counts in collective_counts:
        assert rank_counts[("ours", "ddp", schedule)]["all_reduce"] == 1


# --- parameters without a gradient ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["fsdp", "plain"])
def test_a_trainable_parameter_without_gradient_is_an_error_naming_it_unless_marked_unused(kind: str) -> None:
    """Under zb-h1 the weight pass must reach every parameter the graph used; one never called
    is named (fsdp: FSDP2 layers; plain: conveyor's own all-reduce over 'dp')."""
    per_rank = conveyor.launch(mesh_workers.spare_step, 4, args=("zb-h1", kind, []), timeout=120)
    assert per_rank[:2] == ["trained", "trained"]
    for message in per_rank[2:]:
        assert "'1.spare.weight'" in message and "unused_parameters" in message
    marked = conveyor.launch(mesh_workers.spare_step, 4, args=("zb-h1", kind, ["1.spare.weight", "1.spare.bias"]),
                             timeout=120)
    assert marked == ["trained"] * 4


def test_token_weighted_losses_average_over_the_counted_tokens_of_every_replica() -> None:
    """The replicas count 5 and 7 target tokens (the rest is ignore_index): each micro-batch's
    loss is weighed by its share of all 12, not of its replica's."""
    cases = [("1f1b", "fsdp"), ("zb-h1", "ddp")]
    per_rank = conveyor.launch(mesh_workers.token_weighted, 4, args=(cases,), timeout=120)
    expected, losses = mesh_workers.token_reference()
    for case in cases:
        for rank_result in per_rank:
            for name, tensor in rank_result[case]["weights"].items():
                torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-10, msg=f"{case} {name}")
        for rank in (2, 3):
            torch.testing.assert_close(torch.stack(per_rank[rank][case]["losses"]), torch.stack(losses), rtol=0,
                                       atol=1e-10)
