"""F&B pairs: the IR's text form, validation, the simulator's price, the pairing transform, and
the runtime's overlapped execution giving exactly the unpaired program's results (float64)."""

from __future__ import annotations

import pytest
import torch

import conveyor
from conveyor.errors import LaunchError
from conveyor.schedule import Schedule, ScheduleError, make_schedule, pair_overlapping, simulate, validate
from conveyor.schedule.links import link_order

import pair_workers

PAIRED_TEXT = "0F0 0F1&0B0 0B1\n1F0 1B0 1F1 1B1\n"


def test_a_pair_round_trips_through_the_text_form() -> None:
    program = Schedule.from_text(PAIRED_TEXT)
    assert program.ranks[0][1].overlaps_next and not program.ranks[0][2].overlaps_next
    assert program.to_text() == PAIRED_TEXT
    assert not program.unpaired().has_pairs and program.unpaired().ranks == program.ranks


def test_only_a_forward_opens_a_pair() -> None:
    with pytest.raises(ValueError, match="only a forward opens an F&B pair"):
        conveyor.Action("B", 0, 0, overlaps_next=True)


def test_a_pair_needs_a_backward_of_another_microbatch() -> None:
    with pytest.raises(ScheduleError, match="its own backward"):
        validate(Schedule.from_text("0F0&0B0\n1F0 1B0\n"))
    with pytest.raises(ScheduleError, match="has no backward after it"):
        validate(Schedule.from_text("0F0&0F1 0B0 0B1\n1F0 1B0 1F1 1B1\n"))


def test_a_pair_whose_backward_waits_on_its_own_forward_deadlocks() -> None:
    # 0F0's output is what stage 1 needs before it can send 0B1's gradient... via micro-batch 0 only if
    # 1 runs 1B0 first; here rank 1 sends B1's gradient only after B0, and B0 needs F0 paired with B1.
    with pytest.raises(ScheduleError, match="a pair needs both inputs"):
        validate(Schedule.from_text("0F0&0B1 0F1 0B0\n1F1 1B1 1F0 1B0\n"))


def test_pairs_keep_every_links_message_order() -> None:
    for name, stages in (("1f1b", 4), ("zb-h1", 4), ("zb-v", 8), ("interleaved-1f1b", 8)):
        program = make_schedule(name, 4, stages, 8)
        paired = pair_overlapping(program)
        assert paired.has_pairs
        assert link_order(paired) == link_order(program)


def test_the_simulator_starts_a_pair_with_both_inputs_and_prices_it_forward_plus_backward() -> None:
    program = Schedule.from_text("0F0 0F1&0B0 0B1\n1F0 1B0 1F1 1B1\n")
    costs = {"F": 1.0, "B": 2.0}

    def pair_times(overlap: float) -> tuple[float, float, float]:
        events = {str(e.action): e for e in simulate(program, costs=costs, overlap=overlap).events if e.rank == 0}
        return events["0F1"].start, events["0F1"].end, events["0B0"].end - events["0B0"].start

    # 0B0's gradient arrives at 4 (1F0 at 1..2, 1B0 at 2..4): the pair's forward waits for it
    assert pair_times(0.0) == (4.0, 5.0, 2.0)  # F + B
    assert pair_times(1.0) == (4.0, 5.0, 1.0)  # the shorter chunk (F = 1) hidden under B
    assert pair_times(0.5) == (4.0, 5.0, 1.5)


def test_pairing_never_lengthens_the_simulated_step() -> None:
    for name, stages in (("1f1b", 4), ("zb-h1", 4), ("zb-v", 8), ("interleaved-1f1b", 8)):
        for m in (4, 8, 12):
            program = make_schedule(name, 4, stages, m)
            assert simulate(pair_overlapping(program)).makespan <= simulate(program).makespan


def test_pairing_an_already_paired_or_forward_only_program_changes_nothing() -> None:
    paired = pair_overlapping(make_schedule("1f1b", 4, 4, 8))
    assert pair_overlapping(paired).to_text() == paired.to_text()
    forward = make_schedule("1f1b", 4, 4, 8).forward_only()
    assert pair_overlapping(forward) is forward


CONFIGS = [
    ("mlp", "1f1b", 2, 4, False),
    ("mlp", "1f1b", 2, 5, True),
    ("mlp", "zb-h1", 2, 4, False),
    ("mlp", "zb-v", 4, 5, True),
    ("skip", "interleaved-1f1b", 4, 4, False),
]


@pytest.fixture(scope="module")
def runs() -> list[dict]:
    return conveyor.launch(pair_workers.paired_and_unpaired, 2, args=(CONFIGS,), timeout=180)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}stages-{c[3]}mb-recompute{c[4]}")
def test_a_paired_program_gives_exactly_the_unpaired_results(runs: list[dict], config: tuple) -> None:
    assert sum(rank[(config, "pairs")] for rank in runs) > 0  # the transform found pairs to run
    for rank in runs:
        unpaired, paired = rank[(config, "unpaired")], rank[(config, "paired")]
        for mine, theirs in zip(paired["grads"], unpaired["grads"]):
            assert mine.keys() == theirs.keys()
            for name in theirs:
                assert torch.equal(mine[name], theirs[name]), name
        for mine, theirs in zip(paired["losses"], unpaired["losses"]):
            assert (mine is None) == (theirs is None) and (mine is None or torch.equal(mine, theirs))


def test_a_failing_backward_chunk_names_its_action() -> None:
    with pytest.raises(LaunchError, match=r"backward exploded") as caught:
        conveyor.launch(pair_workers.failing_pair, 2, timeout=60)
    assert "rank 0" in str(caught.value) and "0B" in str(caught.value)


@pytest.mark.parametrize("schedule", ["1f1b", "zb-h1"])
def test_moe_stages_with_their_own_all_to_all_give_the_same_gradients_paired(schedule: str) -> None:
    runs = conveyor.launch(pair_workers.moe_paired_and_unpaired, 4, args=(schedule, 6), timeout=120)
    assert all(rank["pairs"] > 0 for rank in runs[:1])
    for rank in runs:
        for mine, theirs in zip(rank["paired"], rank["unpaired"]):
            assert mine.keys() == theirs.keys()
            for name in theirs:
                assert torch.equal(mine[name], theirs[name]), name


def test_local_pipeline_runs_a_paired_program_to_the_unpaired_results() -> None:
    from models import batch, mlp, mse

    program = make_schedule("zb-v", 2, 4, 4)
    results = []
    for chosen in (program, pair_overlapping(program)):
        runner = conveyor.LocalPipeline(conveyor.pipeline(mlp(layers=8), n_stages=4), schedule=chosen,
                                        n_microbatches=4, loss_fn=mse, n_ranks=2, devices="cpu")
        x, y = batch(0)
        results.append((runner.step(x, target=y), {name: p.grad for name, p in runner.named_parameters()}))
    (loss, grads), (paired_loss, paired_grads) = results
    assert pair_overlapping(program).has_pairs and torch.equal(loss, paired_loss)
    assert all(torch.equal(grads[name], paired_grads[name]) for name in grads)
