"""The memory benchmark's per-rank measurement equals the simulator's bound to the byte: each
rank's peak of the bytes autograd saved during a step (4 processes, small widths) is the most, over
the simulated step, of the live (stage, micro-batch) activations' saved bytes."""

from __future__ import annotations

import pytest

import conveyor

from bench import memory

WIDTH = 64


@pytest.fixture(scope="module")
def measured() -> dict:
    return conveyor.launch(memory.rank_worker, memory.N_RANKS, args=(list(memory.RANK_CASES), WIDTH, True),
                           threads_per_rank=1, timeout=300)[0]


@pytest.mark.parametrize("name", list(memory.RANK_CASES))
def test_each_ranks_peak_saved_bytes_equal_the_simulated_bound(measured: dict, name: str) -> None:
    gathered = measured[name]
    stage_bytes = {stage: nbytes for data in gathered for stage, nbytes in data["stage_bytes"].items()}
    for rank, data in enumerate(gathered):
        bound = memory.rank_bound(name, memory.N_RANKS, memory.N_MICROBATCHES, stage_bytes, rank)
        assert data["saved"][-1] == bound, f"rank {rank}"
        assert data["left"] == 0, f"rank {rank} kept saved tensors after the step"


def test_a_v_min_rank_holds_half_of_1f1bs_rank_0_at_4_ranks(measured: dict) -> None:
    # 1F1B's rank 0: 4 full-size micro-batches; V-Min's: 2 ((4 + 4) // 3) = 4 half-size ones (+ the loss's
    # extra saves on the last stage, which rank 0 holds)
    one_f_one_b = measured["1f1b"][0]["saved"][-1]
    v_min = max(data["saved"][-1] for data in measured["v-min"])
    assert v_min <= 0.55 * one_f_one_b
