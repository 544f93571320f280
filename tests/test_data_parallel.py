"""The pieces of the data-parallel sync that need no process group: which action of a rank's
program is each stage's last backward, and which parameter leaves a graph accumulates into."""

from __future__ import annotations

import torch
import torch.nn as nn

from conveyor.runtime.data_parallel import graph_leaves, last_backwards
from conveyor.schedule import make_schedule


def test_the_last_backward_of_each_stage_is_its_last_full_backward_under_1f1b() -> None:
    program = make_schedule("1f1b", 2, 2, 4)
    assert {str(action) for action in last_backwards(program, 0)} == {"0B3"}
    assert {str(action) for action in last_backwards(program, 1)} == {"1B3"}


def test_under_a_split_backward_the_last_weight_pass_is_the_last_backward() -> None:
    program = make_schedule("zb-h1", 2, 2, 4)
    for rank in (0, 1):
        (last,) = last_backwards(program, rank)
        weight_passes = [a for a in program.ranks[rank] if str(a).startswith(f"{rank}W")]
        assert last == weight_passes[-1]


def test_looped_schedules_mark_one_last_backward_per_local_stage() -> None:
    program = make_schedule("interleaved-1f1b", 2, 4, 4)
    assert sorted(action.stage for action in last_backwards(program, 0)) == [0, 2]
    program = make_schedule("zb-v", 2, 4, 4)
    assert sorted(action.stage for action in last_backwards(program, 0)) == [0, 3]


def test_graph_leaves_are_the_parameters_the_graph_uses_without_the_stage_inputs() -> None:
    torch.manual_seed(0)
    used, unused = nn.Linear(3, 3), nn.Linear(3, 3)
    x = torch.randn(2, 3, requires_grad=True)
    out = used(x).tanh()
    leaves = graph_leaves([out], exclude=[x])
    assert {id(t) for t in leaves} == {id(used.weight), id(used.bias)}
    assert all(id(t) not in {id(unused.weight), id(unused.bias)} for t in leaves)
