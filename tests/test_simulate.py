"""The simulator's timings (bubbles of each schedule) and the timeline renderers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conveyor.schedule import Schedule, simulate
from conveyor.schedule.render import chrome_trace, render_timeline

SPLIT = {"F": 1.0, "I": 1.0, "W": 1.0}  # zero-bubble costs: B = I + W = 2


def idle_per_rank(result) -> list[float]:
    return [result.makespan - busy for busy in result.busy]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 3, 8, 13])
def test_gpipe_and_1f1b_bubble_is_p_minus_1_over_m_plus_p_minus_1(name: str, p: int, m: int) -> None:
    assert simulate(name, p, m).bubble == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p", [1, 2, 3, 4])
@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("groups", [1, 2, 3])
def test_interleaved_bubble_is_closed_form_when_p_divides_m(p: int, v: int, groups: int) -> None:
    m = groups * p
    result = simulate("interleaved-1f1b", v * p, m, {"F": 1 / v, "B": 2 / v}, n_ranks=p)
    assert result.bubble == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize(("p", "v", "m"), [(2, 2, 3), (3, 2, 4), (3, 3, 8), (4, 2, 7), (4, 3, 10), (5, 2, 13)])
def test_interleaved_bubble_is_closed_form_for_any_m_at_least_p(p: int, v: int, m: int) -> None:
    result = simulate("interleaved-1f1b", v * p, m, {"F": 1 / v, "B": 2 / v}, n_ranks=p)
    assert result.bubble == pytest.approx((p - 1) / (v * m + p - 1))


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 4), (4, 8), (4, 13), (8, 32)])
def test_zb_h1_idles_a_third_of_1f1b(p: int, m: int) -> None:
    one_f_one_b, zb_h1 = simulate("1f1b", p, m), simulate("zb-h1", p, m, SPLIT)
    assert idle_per_rank(one_f_one_b) == pytest.approx([3.0 * (p - 1)] * p)
    assert idle_per_rank(zb_h1) == pytest.approx([1.0 * (p - 1)] * p)
    assert zb_h1.bubble == pytest.approx((p - 1) / (3 * m + p - 1))


def test_zb_h1_bubble_fraction_is_about_a_third_of_1f1b_for_many_microbatches() -> None:
    ratio = simulate("zb-h1", 4, 32, SPLIT).bubble / simulate("1f1b", 4, 32).bubble
    assert 1 / 3 <= ratio < 0.36


@pytest.mark.parametrize(("p", "m"), [(2, 4), (4, 3), (4, 8), (6, 12)])
def test_zb_h1_holds_1f1b_full_activations_and_at_most_p_awaiting_w(p: int, m: int) -> None:
    result = simulate("zb-h1", p, m, SPLIT)
    assert result.peak_before_input_grad == simulate("1f1b", p, m).peak_activations
    assert max(result.peak_activations) <= p


@pytest.mark.parametrize(("p", "m"), [(1, 3), (2, 2), (2, 4), (3, 5), (4, 4), (4, 8), (4, 16), (5, 7), (6, 12)])
def test_zb_v_bubble_is_at_most_zb_h1s(p: int, m: int) -> None:
    zb_v = simulate("zb-v", 2 * p, m, SPLIT, n_ranks=p)
    assert zb_v.bubble <= simulate("zb-h1", p, m, SPLIT).bubble + 1e-12


@pytest.mark.parametrize(("p", "m"), [(2, 3), (4, 7), (4, 16)])
def test_zb_v_idles_p_minus_1_per_rank_once_m_is_at_least_2p_minus_1(p: int, m: int) -> None:
    assert idle_per_rank(simulate("zb-v", 2 * p, m, SPLIT, n_ranks=p)) == pytest.approx([p - 1.0] * p)


def test_comm_cost_increases_makespan() -> None:
    free, slow = simulate("1f1b", 4, 8), simulate("1f1b", 4, 8, comm=0.5)
    assert slow.makespan > free.makespan
    assert slow.busy == free.busy


def test_comm_cost_does_not_apply_between_stages_on_one_rank() -> None:
    result = simulate("interleaved-1f1b", 2, 4, n_ranks=1, comm=5.0)
    assert result.makespan == pytest.approx(2 * 4 * 3.0)
    assert result.bubble == pytest.approx(0.0)


def test_per_stage_costs_let_the_slowest_stage_set_the_pace() -> None:
    m = 16
    result = simulate("1f1b", 4, m, {"F": [1, 1, 2, 1], "B": [2, 2, 4, 2]})
    assert result.busy == pytest.approx((3.0 * m, 3.0 * m, 6.0 * m, 3.0 * m))
    assert result.makespan >= 6.0 * m
    assert result.bubble > simulate("1f1b", 4, m).bubble


def test_per_stage_costs_of_the_wrong_length_are_refused() -> None:
    with pytest.raises(ValueError, match="one per stage"):
        simulate("1f1b", 4, 8, {"F": [1, 1, 1]})


def test_unknown_cost_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown action kind"):
        simulate("1f1b", 4, 8, {"X": 1.0})


def test_events_cover_every_action_and_never_overlap_on_a_rank() -> None:
    result = simulate("zb-v", 6, 5, n_ranks=3, comm=0.25)
    assert len(result.events) == sum(len(actions) for actions in result.schedule.ranks)
    for rank, actions in enumerate(result.schedule.ranks):
        mine = sorted((e for e in result.events if e.rank == rank), key=lambda e: e.start)
        assert [e.action for e in mine] == list(actions)
        assert all(a.end <= b.start + 1e-12 for a, b in zip(mine, mine[1:]))


def test_simulate_accepts_a_schedule_object() -> None:
    schedule = Schedule.from_text("0F0 0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n")
    result = simulate(schedule)
    assert result.makespan == pytest.approx(1 + 3 + 3 + 2)


def test_render_timeline_writes_a_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = render_timeline(simulate("zb-h1", 4, 8, SPLIT), tmp_path / "zb.png", title="zb-h1")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_render_timeline_accepts_plain_tuples_and_writes_svg(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    events = [(0, "0F0", 0.0, 1.0), (1, "1F0", 1.0, 2.0), (1, "1B0", 2.0, 4.0), (0, "0B0", 4.0, 6.0)]
    path = render_timeline(events, tmp_path / "tiny.svg", n_ranks=3)
    assert "<svg" in path.read_text()


def test_chrome_trace_has_one_event_per_action_on_one_track_per_rank(tmp_path: Path) -> None:
    result = simulate("interleaved-1f1b", 8, 8, n_ranks=4)
    with open(chrome_trace(result.events, tmp_path / "trace.json")) as file:
        trace = json.load(file)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == len(result.events)
    assert {e["tid"] for e in spans} == {0, 1, 2, 3}
    assert spans[0]["name"] == str(result.events[0].action)
