"""The planner on profiles with known costs: it must pick what the closed forms say is best.

Profiles are built directly (no timing noise), except the profiler tests, which time sleeping
blocks whose costs are known.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn

from conveyor.planning import BlockProfile, Cost, Link, Profile, plan, profile
from conveyor.planning.costs import async_steady_state, shared_core_makespan, stage_costs
from conveyor.schedule import simulate
from conveyor.testing import SleepStage

FREE_LINK = Link(latency_s=0.0, bandwidth_bytes_s=float("inf"))


def uniform(n_blocks: int, forward_s: float = 1e-3, backward_s: float = 2e-3, **kwargs: float) -> Profile:
    blocks = [BlockProfile.simple(f"b{i}", forward_s, backward_s, **kwargs) for i in range(n_blocks)]
    return Profile(blocks, FREE_LINK, rows=(1,))


def test_time_balanced_split_beats_parameter_balanced_split_on_an_uneven_model() -> None:
    # block 0 holds most parameters but is cheap (an embedding); the others cost the time
    blocks = [BlockProfile.simple("embedding", 1e-4, 2e-4, param_bytes=10_000_000)]
    blocks += [BlockProfile.simple(f"block{i}", 1e-3, 2e-3, param_bytes=100_000) for i in range(1, 6)]
    result = plan(Profile(blocks, FREE_LINK, rows=(1,)), 2, batch_size=8, schedules=["1f1b"], microbatches=[8])
    by_split = {c.split: c for c in result.candidates}
    assert by_split["params"].sizes == (1, 5)
    assert result.best.split == "time" and result.best.sizes == (3, 3)
    assert result.best.step_s < by_split["params"].step_s


def test_memory_limit_rules_out_gpipe_in_favour_of_1f1b() -> None:
    p, m, rows, activation = 4, 8, 2, 1_000_000
    prof = uniform(4, param_bytes=1000, activation_bytes=activation)
    free = plan(prof, p, batch_size=m * rows, schedules=["gpipe", "1f1b"], microbatches=[m])
    gpipe = next(c for c in free.candidates if c.schedule == "gpipe")
    one_f_one_b = next(c for c in free.candidates if c.schedule == "1f1b")
    # GPipe keeps all m micro-batches alive on every stage; 1F1B at most p - s on stage s
    assert gpipe.peak_memory == 4 * 1000 + m * rows * activation
    assert one_f_one_b.peak_memory == 4 * 1000 + p * rows * activation
    limited = plan(prof, p, batch_size=m * rows, schedules=["gpipe", "1f1b"], microbatches=[m],
                   memory_per_rank=(gpipe.peak_memory + one_f_one_b.peak_memory) / 2)
    assert limited.best.schedule == "1f1b" and limited.best.fits
    assert not next(c for c in limited.candidates if c.schedule == "gpipe").fits


@pytest.mark.parametrize("m", [1, 2, 4, 8, 16])
def test_more_microbatches_shrink_the_bubble_as_p_minus_1_over_m_plus_p_minus_1(m: int) -> None:
    p, rows = 4, 2
    result = plan(uniform(p), p, batch_size=16 * rows, schedules=["1f1b"], microbatches=[m])
    candidate = result.best
    assert candidate.bubble == pytest.approx((p - 1) / (m + p - 1))
    micro_rows = 16 * rows / m
    assert candidate.step_s == pytest.approx((m + p - 1) * 3e-3 * micro_rows)


def test_without_fixed_costs_the_planner_takes_the_most_microbatches() -> None:
    result = plan(uniform(4), 4, batch_size=16, schedules=["1f1b"])
    assert result.best.n_microbatches == 16


def test_a_fixed_cost_per_action_gives_the_closed_form_optimum_of_microbatches() -> None:
    # step(m) = (m + p - 1) * (a + c * B / m) is smallest at m = sqrt((p - 1) * c * B / a) = 4 here
    blocks = [BlockProfile("b", Cost(0.012, 1e-3), Cost(0.024, 2e-3), Cost(0.0, 0.0), Cost(0.0, 0.0), 0, 0.0, 0.0)
              for _ in range(4)]
    result = plan(Profile(blocks, FREE_LINK, rows=(1,)), 4, batch_size=64, schedules=["1f1b"],
                  microbatches=[1, 2, 4, 8, 16, 32, 64])
    assert result.best.n_microbatches == 4


def test_slow_links_are_charged_per_message() -> None:
    link = Link(latency_s=1e-3, bandwidth_bytes_s=1e6)
    prof = Profile([BlockProfile.simple(f"b{i}", 1e-3, 2e-3, output_bytes=1000) for i in range(2)], link, rows=(1,))
    candidate = plan(prof, 2, batch_size=2, schedules=["gpipe"], microbatches=[1]).best
    # F0, message, F1, B1, message, B0 with 2 rows and 2000 bytes per message
    assert candidate.step_s == pytest.approx(2 * (2e-3 + 4e-3) + 2 * (1e-3 + 2000 / 1e6))


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_shared_core_makespan_equals_the_simulator_with_a_core_per_rank(schedule: str) -> None:
    costs = {"F": [1.0, 2.0, 1.5], "B": [2.0, 3.0, 2.5], "I": [0.0, 1.5, 1.0], "W": [2.0, 1.5, 1.5]}
    result = simulate(schedule, 3, 5, costs, comm=0.25)
    assert shared_core_makespan(result.schedule, costs, 0.25, slots=3) == pytest.approx(result.makespan)


def test_one_core_for_all_ranks_serialises_every_action() -> None:
    costs = {"F": [1.0, 2.0], "B": [2.0, 3.0], "I": [0.0, 0.0], "W": [0.0, 0.0]}
    program = simulate("1f1b", 2, 4, costs).schedule
    assert shared_core_makespan(program, costs, 0.0, slots=1) == pytest.approx(4 * (1 + 2 + 2 + 3))


def test_four_ranks_on_two_cores_are_planned_slower_than_with_a_core_each() -> None:
    prof = uniform(4)
    own = plan(prof, 4, batch_size=8, schedules=["1f1b"], microbatches=[8], cores=0).best
    shared = plan(prof, 4, batch_size=8, schedules=["1f1b"], microbatches=[8], cores=2).best
    total_work = 4 * 8 * 3e-3  # 4 stages x 8 micro-batches x (F + B), shared by 2 cores
    assert shared.step_s >= total_work / 2 > own.step_s


def test_pipedream_throughput_is_set_by_the_slowest_stage_and_replicas_divide_it() -> None:
    blocks = [BlockProfile.simple("a", 1e-3, 2e-3), BlockProfile.simple("b", 2e-3, 4e-3)]
    prof = Profile(blocks, FREE_LINK, rows=(1,))
    alone = async_steady_state(prof, (1, 1), 4, (1, 1), "pipedream")
    replicated = async_steady_state(prof, (1, 1), 4, (1, 2), "pipedream")
    assert alone.seconds_per_microbatch == pytest.approx(4 * 6e-3) and alone.bottleneck == 1
    assert replicated.seconds_per_microbatch == pytest.approx(4 * 3e-3)


def test_pipedream_stashes_n_stages_minus_s_weight_versions_and_2bw_two() -> None:
    prof = uniform(3, param_bytes=100)
    result = plan(prof, 3, batch_size=3, schedules=["pipedream", "pipedream-2bw"], microbatches=[3])
    pipedream = next(c for c in result.candidates if c.schedule == "pipedream" and c.replicas is None)
    two_bw = next(c for c in result.candidates if c.schedule == "pipedream-2bw" and c.replicas is None)
    assert [m.weights for m in pipedream.memory] == [300, 200, 100]
    assert [m.weights for m in two_bw.memory] == [200, 200, 200]
    assert pipedream.runnable and two_bw.runnable


def test_interleaved_and_zb_v_place_several_stages_per_rank() -> None:
    result = plan(uniform(8), 2, batch_size=8, schedules=["interleaved-1f1b", "zb-v"], microbatches=[4])
    zb_v = next(c for c in result.candidates if c.schedule == "zb-v")
    assert zb_v.placement == (0, 1, 1, 0)
    interleaved = {c.n_stages: c.placement for c in result.candidates if c.schedule == "interleaved-1f1b"}
    assert interleaved[4] == (0, 1, 0, 1) and set(interleaved) == {4, 6, 8}


def test_stage_zero_has_no_input_gradient_so_its_split_backward_is_all_weight_gradient() -> None:
    costs = stage_costs(uniform(2), (1, 1), 1)
    assert costs["I"][0] == 0 and costs["W"][0] == costs["B"][0] and costs["I"][1] > 0


def test_profile_round_trips_through_json(tmp_path: Path) -> None:
    blocks = [BlockProfile("x", Cost(1e-4, 2e-3), Cost(0.0, 4e-3), Cost(0.0, 2e-3), Cost(1e-5, 2e-3), 10, 5.5, 3.0)]
    original = Profile(blocks, Link(1e-5, 2e9, "given"), rows=(2, 8), threads=1, cores=2, units="u", model="m")
    assert Profile.load(original.save(tmp_path / "p.json")) == original


def test_a_profile_with_measured_sizes_round_trips_through_json(tmp_path: Path) -> None:
    measured = Cost(1e-4, 1e-3, ((2.0, 2e-3), (4.0, 3e-3), (8.0, 9e-3)))
    blocks = [BlockProfile("x", measured, measured, measured, measured, 10, 5.5, 3.0)]
    original = Profile(blocks, Link(1e-5, 2e9, "given"), rows=(2, 4, 8), threads=1, cores=2, units="u", model="m",
                       stretch=1.5, clock="cpu")
    assert Profile.load(original.save(tmp_path / "p.json")) == original


def test_a_cost_interpolates_between_its_measured_sizes_and_follows_its_line_beyond_them() -> None:
    cost = Cost(1e-3, 1e-3, ((2.0, 2e-3), (4.0, 3e-3), (8.0, 9e-3)))
    assert cost.at(3) == pytest.approx(2.5e-3)  # halfway between the 2- and 4-row measurements
    assert cost.at(6) == pytest.approx(6e-3)
    assert cost.at(8) == pytest.approx(9e-3)
    assert cost.at(16) == pytest.approx(1e-3 + 16e-3)  # beyond the largest: fixed_s + per_row_s * rows


def test_a_profile_measures_each_block_at_four_batch_sizes() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    measured = profile(model, torch.randn(16, 8), target=torch.randn(16, 1), loss_fn=nn.functional.mse_loss,
                       runs=1, link=None, min_seconds=0.0)
    assert measured.rows == (2, 4, 8, 16)
    assert all([rows for rows, _ in block.forward.points] == [2.0, 4.0, 8.0, 16.0] for block in measured.blocks)


def test_explain_names_the_choice_and_the_memory_it_needs() -> None:
    result = plan(uniform(4, param_bytes=1 << 20), 2, batch_size=8, schedules=["gpipe", "1f1b"],
                  memory_per_rank=1 << 30)
    text = result.explain()
    assert result.best.schedule in text.splitlines()[1] and "fits 1.00 GiB" in text
    first_row = result.table().splitlines()[1]
    assert result.best.schedule in first_row and str(list(result.best.sizes)) in first_row


# --- the profiler -----------------------------------------------------------------------------------
def test_profile_times_forward_and_both_backward_halves_of_sleeping_blocks() -> None:
    model = nn.Sequential(SleepStage(0.01, 0.02, 0.03), SleepStage(0.01, 0.02, 0.03))
    prof = profile(model, (torch.zeros(4, 2),), runs=2, link=None)
    second = prof.blocks[1]
    assert second.forward.at(4) == pytest.approx(0.01, abs=0.006)
    assert second.input_grad.at(4) == pytest.approx(0.02, abs=0.006)
    assert second.weight_grad.at(4) == pytest.approx(0.03, abs=0.006)
    assert second.backward.at(4) == pytest.approx(0.05, abs=0.008)


def test_profile_counts_saved_activations_and_boundary_bytes_but_not_weights() -> None:
    model = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 8))
    prof = profile(model, (torch.zeros(8, 16),), runs=1, link=None)
    first, second = prof.blocks
    assert first.activation_bytes_per_row == 16 * 4  # the input the weight gradient needs
    assert second.activation_bytes_per_row == 32 * 4
    assert first.output_bytes_per_row == 32 * 4
    assert first.param_bytes == (16 * 32 + 32) * 4
    assert all(p.grad is None for p in model.parameters())  # profiling leaves no gradients behind


def test_times_profiled_by_processes_sharing_the_cores_are_divided_by_their_sharing_factor() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    prof = profile(model, (torch.zeros(4, 8),), runs=1, link=None, threads=1, concurrent=2)
    assert prof.concurrent == 2 and len(prof.blocks) == 2 and prof.blocks[0].forward.at(4) > 0
    blocks = [BlockProfile.simple("b", 4e-3, 8e-3)]
    shared = Profile(blocks, threads=1, cores=2, concurrent=4)  # 4 processes on 2 cores: each at half speed
    assert stage_costs(shared, (1,), 1)["F"] == [pytest.approx(2e-3)]
    assert stage_costs(Profile(blocks, threads=1, cores=4, concurrent=4), (1,), 1)["F"] == [pytest.approx(4e-3)]


def test_the_stretch_the_profiling_processes_measured_replaces_the_even_share_of_the_cores() -> None:
    blocks = [BlockProfile.simple("b", 4e-3, 8e-3)]
    assert stage_costs(Profile(blocks, threads=1, cores=2, concurrent=4, stretch=1.6), (1,), 1)["F"] == \
        [pytest.approx(2.5e-3)]
    assert stage_costs(Profile(blocks, threads=1, cores=2, concurrent=1, stretch=1.6), (1,), 1)["F"] == \
        [pytest.approx(4e-3)]  # one process: what loaded the machine stays in its times
    measured = profile(nn.Sequential(nn.Linear(8, 8)), (torch.zeros(4, 8),), runs=1, link=None, threads=1,
                       concurrent=2, min_seconds=0.0)
    assert measured.stretch > 0


def test_times_taken_in_cpu_seconds_are_not_divided_by_the_share_of_the_cores() -> None:
    blocks = [BlockProfile.simple("b", 4e-3, 8e-3)]
    in_cpu_seconds = Profile(blocks, threads=1, cores=2, concurrent=4, stretch=2.0, clock="cpu")
    assert stage_costs(in_cpu_seconds, (1,), 1)["F"] == [pytest.approx(4e-3)]


def test_a_profile_times_in_cpu_seconds_only_when_single_threaded_processes_outnumber_the_cores() -> None:
    import os

    from conveyor.planning.profile import oversubscribed

    cores = os.cpu_count() or 1
    assert oversubscribed(cores + 1, 1) and not oversubscribed(cores, 1) and not oversubscribed(cores + 1, 2)
    model = nn.Sequential(nn.Linear(8, 8))
    assert profile(model, (torch.zeros(4, 8),), runs=1, link=None, min_seconds=0.0, cpu_time=True).clock == "cpu"
    assert profile(model, (torch.zeros(4, 8),), runs=1, link=None, min_seconds=0.0).clock == "wall"


def test_measured_link_has_positive_latency_and_bandwidth() -> None:
    from conveyor.planning.link import measure_link

    link = measure_link(sizes=(4 << 10, 1 << 20), repeats=2, processes=3)
    assert link.latency_s > 0 and link.bandwidth_bytes_s > 0 and "1 computing" in link.source


def test_runtime_overhead_is_paid_by_every_action_on_the_critical_path() -> None:
    p, m, overhead = 4, 8, 5e-4
    blocks = [BlockProfile.simple(f"b{i}", 1e-3, 2e-3) for i in range(p)]
    prof = Profile(blocks, Link(latency_s=1.0, bandwidth_bytes_s=float("inf")), rows=(1,), action_overhead_s=overhead)
    candidate = plan(prof, p, batch_size=m, schedules=["1f1b"], microbatches=[m]).best
    # the measured overhead includes the hand-off, so the link's latency is not charged again
    assert candidate.step_s == pytest.approx((m + p - 1) * (3e-3 + 2 * overhead))


def test_verify_reports_replicas_a_schedule_cannot_take_as_not_runnable_without_running_them() -> None:
    from dataclasses import replace

    from conveyor.planning.verify import format_verified, verify
    from conveyor.workloads import WorkloadSpec

    result = plan(uniform(4), 4, batch_size=4, schedules=["pipedream-2bw"], microbatches=[2])
    replicated = [c for c in result.candidates if c.replicas and max(c.replicas) > 1]
    assert replicated and not replicated[0].runnable
    verified = verify(replace(result, candidates=replicated[:1]), WorkloadSpec("demo"), top=1)
    assert verified[0].measured_step_s is None and "not runnable" in format_verified(verified)


def test_a_concurrently_measured_profile_is_used_as_measured_unless_reshared() -> None:
    p, m = 4, 8
    blocks = [BlockProfile.simple(f"b{i}", 1e-3, 2e-3) for i in range(p)]
    measured = Profile(blocks, FREE_LINK, rows=(1,), threads=1, cores=2, concurrent=p)
    kept = plan(measured, p, batch_size=m, schedules=["1f1b"], microbatches=[m]).best
    assert kept.step_s == pytest.approx((m + p - 1) * 3e-3)  # every rank assumed busy, as when profiled
    reshared = plan(measured, p, batch_size=m, schedules=["1f1b"], microbatches=[m], reshare=True).best
    halved = {k: [v / 2 for v in vals] for k, vals in stage_costs(replace_concurrent(measured), (1,) * p, 1).items()}
    program = simulate("1f1b", p, m).schedule
    assert reshared.step_s == pytest.approx(shared_core_makespan(program, halved, 0.0, slots=2))
    assert reshared.step_s < kept.step_s  # the bubbles leave cores free to the busy ranks


def replace_concurrent(profile: Profile) -> Profile:
    from dataclasses import replace

    return replace(profile, concurrent=1)


def test_a_weight_tied_across_stages_makes_asynchronous_candidates_unrunnable() -> None:
    prof = uniform(4)
    prof.tied_blocks = [[0, 3]]  # e.g. GPT-2's wte (first block) and lm_head (last block)
    result = plan(prof, n_ranks=2, batch_size=4)
    asynchronous = [c for c in result.candidates if c.is_async]
    synchronous = [c for c in result.candidates if not c.is_async]
    assert asynchronous and not any(c.runnable for c in asynchronous)
    assert any(c.runnable for c in synchronous) and not result.best_runnable.is_async


def test_profile_records_which_blocks_hold_a_tied_weight() -> None:
    first, middle, last = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
    last.weight = first.weight
    prof = profile(nn.Sequential(first, middle, last), (torch.randn(4, 4),), runs=1, link=None)
    assert prof.tied_blocks == [[0, 2]]


def test_the_automatic_schedule_is_a_runnable_candidate_at_least_as_fast_as_the_named_ones() -> None:
    blocks = [BlockProfile.simple(f"b{i}", 1e-3, 2e-3) for i in range(3)]
    blocks.append(BlockProfile.simple("head", 2e-3, 4e-3))  # a last stage twice as slow
    prof = Profile(blocks, Link(latency_s=5e-4, bandwidth_bytes_s=float("inf")), rows=(1,))
    result = plan(prof, 4, batch_size=8, schedules=["1f1b", "zb-h1", "auto"], microbatches=[8])
    auto = next(c for c in result.candidates if c.schedule == "auto")
    assert auto.runnable and auto.fits and max(auto.peak_microbatches) <= 4
    named = [c for c in result.candidates if c.schedule != "auto" and c.sizes == auto.sizes]
    assert named and all(auto.step_s <= c.step_s + 1e-12 for c in named)


def test_a_weight_tied_across_stages_makes_replicated_candidates_unrunnable() -> None:
    prof = uniform(4)
    prof.tied_blocks = [[0, 3]]
    replicated = [c for c in plan(prof, n_ranks=4, batch_size=8, schedules=["pipedream"]).candidates
                  if c.replicas and all(c.n_microbatches % r == 0 for r in c.replicas)]
    assert replicated and not any(c.runnable for c in replicated)
    assert all("tied weights" in (c.refusal or "") for c in replicated)


def test_runnable_is_decided_by_the_runners_own_schedule_checks() -> None:
    from conveyor.schedule import make_schedule

    candidate = next(c for c in plan(uniform(4), n_ranks=4, batch_size=8, microbatches=[3]).candidates
                     if c.replicas and any(3 % r for r in c.replicas))
    with pytest.raises(ValueError) as refused:
        make_schedule(candidate.schedule, 4, candidate.n_stages, 3, replicas=list(candidate.replicas))
    assert not candidate.runnable and candidate.refusal == str(refused.value)


def test_runnable_candidates_rank_before_faster_ones_the_runner_refuses() -> None:
    prof = uniform(4)
    prof.tied_blocks = [[0, 3]]
    result = plan(prof, n_ranks=2, batch_size=4)
    assert result.best.runnable and result.best is result.best_runnable
    assert any(not c.runnable and c.throughput > result.best.throughput for c in result.candidates)


def test_plan_searches_only_the_schedules_it_is_given() -> None:
    result = plan(uniform(4), n_ranks=2, batch_size=4, schedules=["zb-h1", "pipedream-2bw"])
    assert {c.schedule for c in result.candidates} == {"zb-h1", "pipedream-2bw"}


def with_updates_of(prof: Profile, update_s: float, stash_s: float = 0.0) -> Profile:
    from dataclasses import replace

    return replace(prof, blocks=[replace(b, update_s=update_s, stash_s=stash_s) for b in prof.blocks])


def test_a_synchronous_step_ends_with_the_optimizer_step_of_the_rank_that_finishes_last() -> None:
    # 1F1B on 2 equal stages: rank 0 runs the last backward, then its own optimizer step
    free = plan(uniform(2), 2, batch_size=4, schedules=["1f1b"], microbatches=[4]).best
    charged = plan(with_updates_of(uniform(2), 5e-3), 2, batch_size=4, schedules=["1f1b"], microbatches=[4]).best
    assert charged.step_s == pytest.approx(free.step_s + 5e-3)


@pytest.mark.parametrize(("schedule", "window"), [("pipedream", 1), ("pipedream-2bw", 2)])
def test_every_asynchronous_update_charges_an_optimizer_step_and_a_weight_copy(schedule: str, window: int) -> None:
    prof = with_updates_of(uniform(2), 4e-3, 2e-3)
    estimate = async_steady_state(prof, (1, 1), 1.0, (1, 1), schedule)
    assert estimate.seconds_per_microbatch == pytest.approx(3e-3 + 6e-3 / window)


def test_profile_times_an_optimizer_step_and_a_weight_copy_only_for_blocks_with_parameters() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    before = [p.detach().clone() for p in model.parameters()]
    prof = profile(model, (torch.randn(8, 16),), runs=1, link=None,
                   optimizer=lambda params: torch.optim.SGD(params, lr=1.0))
    assert prof.blocks[0].update_s > 0 and prof.blocks[0].stash_s > 0
    assert prof.blocks[1].update_s == 0 and prof.blocks[1].stash_s == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_a_replicated_layout_predicted_faster_is_flagged_low_confidence_and_not_ranked_first() -> None:
    blocks = [BlockProfile.simple("light", 1e-3, 2e-3)] + [BlockProfile.simple("heavy", 8e-3, 16e-3)]
    blocks += [BlockProfile.simple("light", 1e-3, 2e-3)]
    result = plan(Profile(blocks, FREE_LINK, rows=(1,)), 3, batch_size=4, schedules=["pipedream"], microbatches=[4])
    replicated = max((c for c in result.candidates if c.replicas), key=lambda c: c.throughput)
    assert replicated.runnable and replicated.throughput > result.best.throughput
    assert replicated.confidence == "low" and result.best.confidence == "high"
    assert "low confidence" in result.explain()


def test_the_automatic_schedule_pays_the_same_optimizer_step_as_the_named_ones() -> None:
    # one cost model (costs.action_costs) for the planner's simulations and conveyor.schedule.search
    free, charged = uniform(2), with_updates_of(uniform(2), 5e-3)
    for name in ("1f1b", "auto"):
        before = plan(free, 2, batch_size=4, schedules=[name], microbatches=[4]).best
        after = plan(charged, 2, batch_size=4, schedules=[name], microbatches=[4]).best
        assert after.step_s == pytest.approx(before.step_s + 5e-3)


def test_the_automatic_schedule_is_runnable_only_with_one_stage_per_rank() -> None:
    from conveyor.planning.runnable import runner_refusal

    assert runner_refusal("auto", 2, 2, 4, None, True) is None  # synchronous: ties are fine
    assert "one stage per rank" in runner_refusal("auto", 2, 4, 4, None, False)
