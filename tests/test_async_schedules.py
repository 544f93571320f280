"""The asynchronous programs as data: lazy streams, versions, updates, validation."""

from __future__ import annotations

import pytest

from conveyor.schedule import Schedule, ScheduleError, make_schedule, simulate, validate

ASYNC = [("pipedream", {}), ("pipedream", {"vertical_sync": True}), ("pipedream-2bw", {}),
         ("pipedream", {"replicas": [2, 1, 1]})]


@pytest.mark.parametrize(("name", "options"), ASYNC)
def test_the_lazy_stream_yields_exactly_the_finite_program(name: str, options: dict) -> None:
    n_ranks = sum(options.get("replicas", [3, 0, 0]))
    for n_microbatches in (2, 4, 6, 12):
        program = make_schedule(name, n_ranks, 3, n_microbatches, **options)
        assert program.stream is not None
        for rank in range(n_ranks):
            lazy = [str(a) for a in program.stream(rank, lambda k, m=n_microbatches: k < m)]
            assert lazy == [str(a) for a in program.ranks[rank]]


@pytest.mark.parametrize(("name", "options"), ASYNC)
def test_text_form_keeps_versions_and_replicas(name: str, options: dict) -> None:
    n_ranks = sum(options.get("replicas", [3, 0, 0]))
    program = make_schedule(name, n_ranks, 3, 6, **options)
    parsed = Schedule.from_text(program.to_text())
    assert parsed.to_text() == program.to_text()
    assert parsed.replicas == program.replicas
    validate(parsed)


def test_a_forward_on_a_version_not_made_yet_is_rejected() -> None:
    program = Schedule.from_text("0F0v0 0F1v1 0B0 0U0 0B1 0U1\n1F0 1B0 1F1 1B1\n")
    with pytest.raises(ScheduleError, match="version 1 does not exist yet"):
        validate(program)


def test_an_update_before_its_backward_is_rejected() -> None:
    with pytest.raises(ScheduleError, match="before 0B0"):
        validate(Schedule.from_text("0F0v0 0U0 0B0\n1F0 1B0\n"))


def test_replicas_that_update_at_different_points_deadlock_and_are_reported() -> None:
    program = Schedule.from_text("# placement: 0,1 2\n0F0v0 0B0 0U0\n0F1v0 0B1\n1F0 1B0 1F1 1B1\n")
    with pytest.raises(ScheduleError, match="other replicas"):
        validate(program)


def test_2bw_refuses_a_window_shorter_than_the_pipeline() -> None:
    with pytest.raises(ValueError, match="window=4 or more"):
        make_schedule("pipedream-2bw", 4, 4, 8, window=2)


def test_replicated_updates_need_microbatch_counts_divisible_by_the_replicas() -> None:
    with pytest.raises(ValueError, match="multiple of 2"):
        make_schedule("pipedream", 4, 3, 3, replicas=[2, 1, 1])


def test_pipedream_2bw_updates_once_per_window_and_uses_one_stale_version() -> None:
    program = make_schedule("pipedream-2bw", 2, 2, 8, window=2)
    updates = [a.microbatch for a in program.ranks[0] if a.kind == "U"]
    versions = [a.version for a in program.ranks[0] if a.kind == "F"]
    assert updates == [1, 3, 5, 7]
    assert versions == [0, 0, 0, 0, 1, 1, 2, 2]


def _per_microbatch(**options: object) -> float:
    """Steady-state time per micro-batch of a pipedream stream (stage 0 twice as slow)."""
    costs = {"F": [2.0, 1.0, 1.0], "B": [4.0, 2.0, 2.0]}
    short, long = (simulate("pipedream", 3, m, costs, **options).makespan for m in (48, 96))
    return (long - short) / 48


def test_replicas_waiting_for_each_other_at_updates_cost_a_third_of_the_gain() -> None:
    assert _per_microbatch(n_ranks=3) == pytest.approx(6.0)
    assert _per_microbatch(n_ranks=4, replicas=[2, 1, 1]) == pytest.approx(4.5)


def test_one_more_admitted_microbatch_lets_replicas_reach_the_slowest_unreplicated_stage() -> None:
    assert _per_microbatch(n_ranks=4, replicas=[2, 1, 1], admitted=3) == pytest.approx(3.0)


def test_a_long_pipedream_stream_settles_at_the_slowest_stage_per_microbatch() -> None:
    """The steady state the planner prices in closed form: max over stages of F + B."""
    costs = {"F": [1.0, 1.5, 1.0], "B": [2.0, 3.0, 2.0]}
    short, long = (simulate("pipedream", 3, m, costs).makespan for m in (40, 80))
    assert (long - short) / 40 == pytest.approx(4.5)
