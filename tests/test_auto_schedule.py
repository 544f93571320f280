"""conveyor.schedule.search: the automatic scheduler under a per-rank activation limit, judged by
the simulator against every hand-written schedule with one stage per rank."""

from __future__ import annotations

import pytest

from conveyor.schedule import SCHEDULES, search, simulate, validate

P = 4
BUDGET = 0.3  # seconds of local search per call: the heuristic and the seeds do most of the work


def _hand_written(costs: dict, m: int, limit: int, comm: float) -> dict[str, float]:
    """Makespan of every registered synchronous schedule with one stage per rank that holds at
    most ``limit`` micro-batches per rank (B priced I + W)."""
    table = dict(costs, B=[i + w for i, w in zip(costs["I"], costs["W"])])
    found = {}
    for name in SCHEDULES:
        try:
            result = simulate(name, P, m, table, comm=comm)
        except (ValueError, TypeError):
            continue
        if not result.schedule.is_streaming and max(result.peak_activations) <= limit:
            found[name] = result.makespan
    return found


def _auto(costs: dict, m: int, limit: int = P, comm: float = 0.0) -> float:
    program = search(costs, limit, n_microbatches=m, comm=comm, budget_s=BUDGET)
    result = simulate(program, costs=costs, comm=comm)
    assert max(result.peak_activations) <= limit
    return result.makespan


def _per_stage(values: list[float]) -> dict[str, list[float]]:
    return {"F": list(values), "I": list(values), "W": list(values)}


@pytest.mark.parametrize("m", [4, 8, 12])
@pytest.mark.parametrize("comm", [0.0, 0.1])
def test_equal_costs_at_1f1b_memory_are_at_least_as_good_as_zb_h1_and_1f1b(m: int, comm: float) -> None:
    costs = _per_stage([1.0] * P)
    hand = _hand_written(costs, m, P, comm)
    assert _auto(costs, m, comm=comm) <= min(hand["zb-h1"], hand["1f1b"]) + 1e-9


def test_the_result_is_a_valid_program_named_auto_within_the_limit() -> None:
    program = search(_per_stage([1.0, 1.0, 1.0, 2.0]), 3, n_microbatches=6, budget_s=BUDGET)
    assert validate(program) is program and program.name == "auto"
    assert (program.n_ranks, program.n_stages, program.n_microbatches) == (P, P, 6)
    assert max(simulate(program, costs=_per_stage([1.0, 1.0, 1.0, 2.0])).peak_activations) <= 3


@pytest.mark.parametrize("m", [8, 16])
def test_a_last_stage_twice_as_slow_reaches_the_lower_bound_at_1f1b_memory(m: int) -> None:
    # The last rank can start only after p - 1 forwards and hops, then has m (F + I + W) of work:
    # (p - 1)(F + comm) + m (2 + 2 + 2) bounds every program; ZB-H1 reaches it too, so nothing beats it here.
    comm = 0.1
    costs = _per_stage([1.0, 1.0, 1.0, 2.0])
    bound = (P - 1) * (1.0 + comm) + m * 6.0
    assert _auto(costs, m, comm=comm) == pytest.approx(bound)
    assert all(bound <= makespan + 1e-9 for makespan in _hand_written(costs, m, P, comm).values())


def test_a_last_stage_twice_as_slow_keeps_that_makespan_with_less_memory_than_any_hand_written_schedule() -> None:
    comm, m = 0.1, 8
    costs = _per_stage([1.0, 1.0, 1.0, 2.0])
    assert _hand_written(costs, m, P - 1, comm) == {}  # 1F1B and ZB-H1 hold p, GPipe m
    assert _auto(costs, m, P - 1, comm) == pytest.approx(min(_hand_written(costs, m, P, comm).values()))


@pytest.mark.parametrize("costs", [
    {"F": [1.0] * P, "I": [1.0] * P, "W": [1.0, 1.0, 1.0, 3.0]},  # a head whose weight gradient dominates
    {"F": [1.0, 2.0, 1.0, 1.0], "I": [1.0, 2.0, 1.0, 1.0], "W": [1.0, 2.0, 1.0, 1.0]},  # a slow middle stage
], ids=["heavy-last-W", "slow-middle"])
def test_unequal_stages_with_link_latency_beat_every_hand_written_schedule_at_the_same_memory(costs: dict) -> None:
    comm, m = 0.5, 8
    assert _auto(costs, m, comm=comm) < min(_hand_written(costs, m, P, comm).values()) - 1e-9


def test_unsplit_costs_give_whole_backwards() -> None:
    program = search({"F": [1.0, 1.0, 2.0], "B": [2.0, 2.0, 4.0]}, n_microbatches=5, budget_s=BUDGET)
    assert {a.kind for actions in program.ranks for a in actions} == {"F", "B"}
    assert simulate(program, costs={"F": [1.0, 1.0, 2.0], "B": [2.0, 2.0, 4.0]}).makespan <= \
        simulate("1f1b", 3, 5, {"F": [1.0, 1.0, 2.0], "B": [2.0, 2.0, 4.0]}).makespan


def test_costs_and_limits_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValueError, match="need F and either B or both I and W"):
        search({"F": [1.0, 1.0]}, n_microbatches=4)
    with pytest.raises(ValueError, match="must allow at least 1 micro-batch"):
        search(_per_stage([1.0, 1.0]), 0, n_microbatches=4)
    with pytest.raises(ValueError, match="give per-stage cost lists or n_stages"):
        search({"F": 1.0, "B": 2.0}, n_microbatches=4)
