"""The schedule IR: text form, validation, and the shape of each generator's program."""

from __future__ import annotations

import pytest

from conveyor.schedule import SCHEDULES, Schedule, ScheduleError, simulate, validate
from conveyor.schedule.interleaved import interleaved_1f1b
from conveyor.schedule.zero_bubble import zb_v

V_SCHEDULES = {"zb-v", "v-zb", "dualpipev", "v-min", "v-half"}  # rank r holds stages r and 2p - 1 - r
# (name, n_ranks, n_stages, n_microbatches): every registered schedule, with awkward sizes too
CASES = [
    ("gpipe", 4, 4, 6),
    ("gpipe", 3, 3, 1),
    ("1f1b", 4, 4, 6),
    ("1f1b", 4, 4, 2),
    ("interleaved-1f1b", 2, 4, 4),
    ("interleaved-1f1b", 3, 9, 7),
    ("interleaved-1f1b", 1, 3, 2),
    ("zb-h1", 4, 4, 6),
    ("zb-h1", 4, 4, 2),
    ("zb-v", 3, 6, 5),
    ("zb-v", 4, 8, 3),
    ("zb-v", 4, 8, 16),
    ("v-zb", 3, 6, 5),
    ("zb-h2", 4, 4, 8),
    ("zb-h2", 3, 3, 2),
    ("dualpipev", 2, 4, 4),
    ("dualpipev", 3, 6, 7),
    ("v-min", 3, 6, 5),
    ("v-min", 4, 8, 9),
    ("v-half", 4, 8, 6),
    ("v-half", 5, 10, 11),
    ("pipedream", 4, 4, 6),
    ("pipedream", 2, 2, 1),
    ("pipedream-2bw", 3, 3, 8),
    ("pipedream-2bw", 4, 4, 3),
]


def test_every_registered_schedule_has_cases() -> None:
    assert {case[0] for case in CASES} == set(SCHEDULES)


@pytest.mark.parametrize(("name", "n_ranks", "n_stages", "m"), CASES)
def test_text_round_trip_gives_the_same_program(name: str, n_ranks: int, n_stages: int, m: int) -> None:
    schedule = SCHEDULES[name](n_ranks, n_stages, m)
    parsed = Schedule.from_text(schedule.to_text())
    assert (parsed.ranks, parsed.placement, parsed.n_stages, parsed.n_microbatches) == (
        schedule.ranks, schedule.placement, schedule.n_stages, schedule.n_microbatches
    )


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_generator_programs_validate_over_many_sizes(name: str) -> None:
    for p in (1, 2, 3, 5):
        for m in range(1, 3 * p + 2):
            if name == "interleaved-1f1b":
                if m >= p:
                    validate(SCHEDULES[name](p, 2 * p, m))
                    validate(SCHEDULES[name](p, 3 * p, m))
            elif name in V_SCHEDULES:
                if name != "dualpipev" or m >= 2 * p:
                    validate(SCHEDULES[name](p, 2 * p, m))
            else:
                validate(SCHEDULES[name](p, p, m))


def test_hand_written_program_from_text_validates() -> None:
    schedule = Schedule.from_text("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n")
    assert validate(schedule) is schedule
    assert (schedule.n_ranks, schedule.n_stages, schedule.n_microbatches) == (2, 2, 2)


def test_hand_written_split_backward_with_placement_validates() -> None:
    text = "# placement: 0 1 1 0\n0F0 3F0 3I0 0I0 3W0 0W0\n1F0 2F0 2I0 1I0 2W0 1W0\n"
    schedule = Schedule.from_text(text)
    assert schedule.placement == (0, 1, 1, 0)
    validate(schedule)


def test_deadlocking_program_is_refused_naming_the_blocked_ranks() -> None:
    # rank 0 waits for the gradient of micro-batch 0 before sending micro-batch 1 forward;
    # rank 1 waits for micro-batch 1 before sending that gradient
    schedule = Schedule.from_text("0F0 0B0 0F1 0B1\n1F0 1F1 1B0 1B1\n")
    with pytest.raises(ScheduleError, match="deadlock") as error:
        validate(schedule)
    assert "rank 0 waits at 0B0" in str(error.value)
    assert "rank 1 waits at 1F1" in str(error.value)


def test_simulating_a_deadlocking_program_raises_schedule_error() -> None:
    with pytest.raises(ScheduleError, match="deadlock"):
        simulate(Schedule.from_text("0F0 0B0 0F1 0B1\n1F0 1F1 1B0 1B1\n"))


def test_incomplete_program_is_refused_naming_the_missing_backward() -> None:
    with pytest.raises(ScheduleError, match="no backward") as error:
        validate(Schedule.from_text("0F0 0F1 0B0 0B1\n1F0 1B0 1F1\n"))
    assert "1B1" in str(error.value)


@pytest.mark.parametrize(("p", "m"), [(2, 1), (4, 2), (4, 4), (4, 9), (6, 3)])
def test_1f1b_peak_activations_on_stage_s_are_min_p_minus_s_m(p: int, m: int) -> None:
    assert simulate("1f1b", p, m).peak_activations == tuple(min(p - s, m) for s in range(p))


@pytest.mark.parametrize(("p", "m"), [(2, 1), (4, 4), (4, 9)])
def test_gpipe_peak_activations_are_m_on_every_stage(p: int, m: int) -> None:
    assert simulate("gpipe", p, m).peak_activations == (m,) * p


def test_interleaved_places_stages_round_robin() -> None:
    assert interleaved_1f1b(3, 9, 6).placement == (0, 1, 2, 0, 1, 2, 0, 1, 2)


def test_zb_v_places_stages_in_a_v() -> None:
    assert zb_v(3, 6, 5).placement == (0, 1, 2, 2, 1, 0)
    assert "# placement: 0 1 2 2 1 0" in zb_v(3, 6, 5).to_text()


def test_interleaved_refuses_one_stage_per_rank_and_names_the_fix() -> None:
    with pytest.raises(ValueError, match=r"n_stages=8"):
        interleaved_1f1b(4, 4, 8)


def test_interleaved_refuses_fewer_microbatches_than_ranks() -> None:
    with pytest.raises(ValueError, match="n_microbatches to 4"):
        interleaved_1f1b(4, 8, 3)


def test_zb_v_refuses_other_than_two_stages_per_rank() -> None:
    with pytest.raises(ValueError, match=r"n_stages=8"):
        zb_v(4, 4, 8)


@pytest.mark.parametrize("name", sorted(V_SCHEDULES))
def test_v_schedules_place_stages_in_a_v(name: str) -> None:
    assert SCHEDULES[name](3, 6, 6).placement == (0, 1, 2, 2, 1, 0)


@pytest.mark.parametrize("name", sorted(V_SCHEDULES - {"zb-v", "v-zb"}))
def test_v_schedules_refuse_other_than_two_stages_per_rank(name: str) -> None:
    with pytest.raises(ValueError, match=r"n_stages=8"):
        SCHEDULES[name](4, 4, 8)


def test_zb_h2_refuses_other_than_one_stage_per_rank() -> None:
    with pytest.raises(ValueError, match=r"n_stages=4"):
        SCHEDULES["zb-h2"](4, 8, 8)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_dualpipev_refuses_fewer_than_2p_microbatches_naming_the_minimum(p: int) -> None:
    validate(SCHEDULES["dualpipev"](p, 2 * p, 2 * p))
    with pytest.raises(ValueError, match=rf"at least 2 x {p} ranks = {2 * p} micro-batches"):
        SCHEDULES["dualpipev"](p, 2 * p, 2 * p - 1)


def test_dualpipev_pairs_are_adjacent_forward_then_backward_of_the_other_chunk() -> None:
    # the main phase: F of chunk 0 then B of chunk 1, F of chunk 1 then B of chunk 0 (the F&B pairs)
    program = SCHEDULES["dualpipev"](2, 4, 6).ranks[0]
    text = " ".join(str(a) for a in program)
    assert "0F3 3B1 3F2 0B0" in text
