"""The planner's in-stream factors: how much slower F, B and the optimizer step ran inside a traced
pipeline than profiled alone, measured once per plan and priced into every candidate."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from conveyor.planning import BlockProfile, Link, Profile, plan
from conveyor.planning.calibrate import calibrate, calibration_layout, in_stream_factors, shared_core_factor
from conveyor.planning.costs import stage_costs, stage_updates
from conveyor.workloads import WorkloadSpec

FREE_LINK = Link(latency_s=0.0, bandwidth_bytes_s=float("inf"))
SCRIPT = str(Path(__file__).parent / "helpers" / "plan_script.py")


def two_blocks(update_s: float = 1e-3) -> Profile:
    blocks = [replace(BlockProfile.simple(f"b{i}", 1e-3, 2e-3), update_s=update_s) for i in range(2)]
    return Profile(blocks, FREE_LINK, rows=(1,))


def test_in_stream_factors_multiply_forwards_backwards_and_both_backward_halves() -> None:
    plain = stage_costs(two_blocks(), (1, 1), 4)
    slowed = stage_costs(replace(two_blocks(), in_stream={"F": 1.5, "B": 2.0}), (1, 1), 4)
    assert slowed["F"] == pytest.approx([1.5 * f for f in plain["F"]])
    for kind in "BIW":
        assert slowed[kind] == pytest.approx([2.0 * t for t in plain[kind]])


def test_the_update_factor_prices_every_optimizer_step_and_the_plan_with_it() -> None:
    assert stage_updates(replace(two_blocks(), in_stream={"U": 3.0}), (1, 1)) == pytest.approx([3e-3, 3e-3])
    plain = plan(two_blocks(), 2, batch_size=4, schedules=["1f1b"], microbatches=[4]).best
    slowed = plan(replace(two_blocks(), in_stream={"U": 3.0}), 2, batch_size=4, schedules=["1f1b"],
                  microbatches=[4]).best
    assert slowed.step_s == pytest.approx(plain.step_s + 2e-3)  # the last rank's update: 1 ms -> 3 ms


def test_factors_are_traced_seconds_over_priced_seconds_summed_over_stages() -> None:
    profile = two_blocks()  # F 4 ms, B 8 ms per stage at 4 rows; update 1 ms per stage
    traces = [{"actions": {"0F": [0.006, 0.006, 0.009], "0B": [0.008]}, "update": [0.003, 0.002, 0.002]},
              {"actions": {"1F": [0.002], "1B": [0.012, 0.012]}, "update": [0.001]}]
    factors = in_stream_factors(traces, profile, (1, 1), 4, [0, 1])
    assert factors == pytest.approx({"F": (0.006 + 0.002) / 0.008, "B": (0.008 + 0.012) / 0.016,
                                     "U": (0.002 + 0.001) / 0.002})


def test_the_shared_core_factor_is_the_calibration_steps_measured_over_predicted_span_and_stretches_sync_steps(
) -> None:
    profile = replace(two_blocks(update_s=0.0), cores=1)  # 2 ranks on one core: the sharing is modelled
    predicted = plan(profile, 2, batch_size=4, schedules=["1f1b"], microbatches=[2], reshare=True).best
    spans = [[(0.0, 1.5 * predicted.step_s)] * 3, [(0.0, 0.5 * predicted.step_s)] * 3]  # per rank, per step
    factor = shared_core_factor([{"spans": spans[0]}, {"spans": spans[1]}], profile, (1, 1), 2, 4, 2)
    assert factor == pytest.approx(1.5)  # first start to last end
    stretched = plan(replace(profile, in_stream={"S": factor}), 2, batch_size=4, schedules=["1f1b"],
                     microbatches=[2], reshare=True).best
    assert stretched.step_s == pytest.approx(predicted.step_s * 1.5)


def test_calibration_runs_at_the_planned_microbatch_count_or_the_smallest_power_of_two_for_the_ranks() -> None:
    profile = Profile([BlockProfile.simple(f"b{i}", 1e-3, 2e-3) for i in range(4)], FREE_LINK, rows=(1,))
    assert calibration_layout(profile, 2, 16, n_microbatches=8) == ((2, 2), 8)
    assert calibration_layout(profile, 4, 16) == ((1, 1, 1, 1), 4)
    assert calibration_layout(profile, 4, 6) == ((1, 1, 1, 1), 1)  # no power of two >= 4 divides 6


def test_a_calibration_run_measures_positive_factors_for_a_users_script() -> None:
    from conveyor.cli_plan import plan_workload

    result = plan_workload(WorkloadSpec(SCRIPT), 2, batch_size=None, memory_per_rank=None, runs=1,
                           measure_link=False, calibrate=False)
    factors = calibrate(result.profile, WorkloadSpec(SCRIPT), 2, result.batch_size, steps=2)
    assert set(factors) == {"F", "B", "U"} and all(value > 0 for value in factors.values())
