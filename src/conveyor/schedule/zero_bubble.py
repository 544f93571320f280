"""Zero-bubble schedules (Qi et al., 2023): the backward is split into ``I`` (gradient of the
stage's input, on the critical path) and ``W`` (gradient of its weights, deferrable), and
deferred ``W`` fill the bubbles.

ZB-H1, 4 stages, 6 micro-batches, F = I = W = 1 (one column each)::

    rank 0: F0 F1 F2 F3 .. .. .. I0 W0 F4 I1 W1 F5 I2 W2 I3 W3 I4 W4 I5 W5
    rank 1: .. F0 F1 F2 .. .. I0 F3 I1 W0 F4 I2 W1 F5 I3 W2 I4 W3 I5 W4 W5
    rank 2: .. .. F0 F1 .. I0 F2 I1 F3 I2 W0 F4 I3 W1 F5 I4 W2 I5 W3 W4 W5
    rank 3: .. .. .. F0 I0 F1 I1 F2 I2 F3 I3 W0 F4 I4 W1 F5 I5 W2 W3 W4 W5

Stage ``s`` runs ``p - s`` warm-up forwards and holds back ``s`` of its ``W``: each rank idles
``p - 1`` (1F1B with B = I + W idles ``3 (p - 1)``), for any ``m >= p``. At most ``p - s``
micro-batches are between ``F`` and ``I`` on stage ``s``, as in 1F1B; counting until ``W`` ends,
every stage holds up to ``p`` (1F1B's peak, on stage 0). Per-stage ``p - s`` until ``W`` cannot
go with this bubble: the last stage would have to run F I W back to back.

ZB-H2 (the same paper) spends up to ``2p - 1`` micro-batches of memory: stage ``s`` runs
``2 (p - s) - 1`` warm-up forwards, so the first ``I`` finds every stage busy, and holds back
``2s`` of its ``W``, so that the last stages have work while the final gradients climb back to
stage 0. In a step that ends with one synchronised update each rank idles
``max((p - 1) F, (p - 1)(F + I - 2W))`` for ``m >= 2p - 1``: the paper's ``(p - 1)(F + B - 2W)``
(counted with the update staggered across ranks, which the ``(p - 1) F`` floor of a synchronised
step leaves out), against ZB-H1's ``(p - 1)(F + I - W)``. With ``F = I = W`` both idle
``(p - 1) F``; with ``I > W`` ZB-H2 idles less. 4 stages, 8 micro-batches, F = I = W = 1::

    rank 0: F0 F1 F2 F3 F4 F5 F6 I0 W0 F7 I1 W1 I2 W2 I3 W3 I4 W4 I5 W5 I6 W6 I7 W7 .. .. ..
    rank 1: .. F0 F1 F2 F3 F4 I0 F5 I1 F6 I2 W0 F7 I3 W1 I4 W2 I5 W3 I6 W4 I7 W5 W6 W7 .. ..
    rank 2: .. .. F0 F1 F2 I0 F3 I1 F4 I2 F5 I3 F6 I4 W0 F7 I5 W1 I6 W2 I7 W3 W4 W5 W6 W7 ..
    rank 3: .. .. .. F0 I0 F1 I1 F2 I2 F3 I3 F4 I4 F5 I5 F6 I6 W0 F7 I7 W1 W2 W3 W4 W5 W6 W7

ZB-V, 3 ranks, 6 stages, 5 micro-batches, F = I = W = 1; upper case is rank ``r``'s stage ``r``
(down the V), lower case its stage ``2p - 1 - r`` (back up)::

    rank 0: F0 F1 F2 F3 F4 f0 i0 w0 f1 i1 w1 f2 i2 w2 I0 W0 f3 i3 w3 I1 W1 f4 i4 w4 I2 W2 I3 W3 I4 W4 .. ..
    rank 1: .. F0 F1 F2 f0 F3 f1 i0 w0 f2 i1 w1 F4 I0 W0 f3 i2 w2 I1 W1 f4 i3 w3 I2 i4 I3 W2 I4 W3 w4 W4 ..
    rank 2: .. .. F0 f0 F1 f1 F2 f2 i0 w0 F3 I0 W0 f3 i1 w1 F4 I1 W1 f4 i2 w2 I2 i3 I3 i4 I4 W2 w3 w4 W3 W4

The V puts the first and the last stage on rank 0, so the turn-around at the bottom of the V
costs no message; each rank idles ``p - 1`` for ``m >= 2p - 1``. Qi et al.'s V-ZB (2024), built
from their V building block, has ZB-V's figures: ``2p`` live (stage, micro-batch) activations per
rank (``p`` full-size micro-batches, 1F1B's) and those ``p - 1`` idle slots, the least a step with
one synchronised update allows; the name ``"v-zb"`` runs this program.
"""

from __future__ import annotations

from .actions import FORWARD, INPUT_GRAD, WEIGHT_GRAD, Action, Schedule
from .checks import require_one_stage_per_rank

__all__ = ["zb_h1", "zb_h2", "zb_v"]


def _zb_stage(stage: int, n_microbatches: int, warmup: int, held: int) -> tuple[Action, ...]:
    """Stage ``stage``'s one-stage-per-rank zero-bubble program: ``warmup`` forwards, then per
    micro-batch ``I``, a ``W`` once more than ``held`` are pending, and the next forward; the
    held-back ``W`` at the end."""
    m = n_microbatches
    warmup = min(warmup, m)
    program = [Action(FORWARD, stage, i) for i in range(warmup)]
    forwards, weights = warmup, 0
    for i in range(m):
        program.append(Action(INPUT_GRAD, stage, i))
        if i + 1 - weights > held:
            program.append(Action(WEIGHT_GRAD, stage, weights))
            weights += 1
        if forwards < m:
            program.append(Action(FORWARD, stage, forwards))
            forwards += 1
    program += [Action(WEIGHT_GRAD, stage, i) for i in range(weights, m)]
    return tuple(program)


def zb_h1(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """ZB-H1: one stage per rank, split backward, stage ``s`` deferring ``s`` of its ``W``. Any ``m >= 1``."""
    require_one_stage_per_rank("zb-h1", n_ranks, n_stages)
    p = n_stages
    ranks = tuple(_zb_stage(stage, n_microbatches, p - stage, stage) for stage in range(p))
    return Schedule(ranks, n_stages, n_microbatches, name="zb-h1")


def zb_h2(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """ZB-H2: one stage per rank, ``2 (p - s) - 1`` warm-up forwards on stage ``s`` and ``2s`` of its
    ``W`` held back: up to ``2p - 1`` micro-batches live per stage. Any ``m >= 1``."""
    require_one_stage_per_rank("zb-h2", n_ranks, n_stages)
    p = n_stages
    ranks = tuple(_zb_stage(stage, n_microbatches, 2 * (p - stage) - 1, 2 * stage) for stage in range(p))
    return Schedule(ranks, n_stages, n_microbatches, name="zb-h2")


def _zb_v_rank(rank: int, n_ranks: int, n_microbatches: int) -> tuple[Action, ...]:
    """Rank ``rank``'s ZB-V program.

    Phases follow the ZB-V figure; a step whose input is not there yet (more steps than
    micro-batches) is skipped. For ``p < m < 2p - 1`` the program is built for ``2p - 1``
    micro-batches and trimmed to ``m``, which fills the pipeline better.
    """
    p = n_ranks
    m = n_microbatches if n_microbatches <= p else max(n_microbatches, 2 * p - 1)
    down, up = rank, 2 * p - 1 - rank  # the rank's stage on the way down the V, and back up
    program: list[Action] = []
    done = {(kind, stage): 0 for kind in (FORWARD, INPUT_GRAD, WEIGHT_GRAD) for stage in (down, up)}
    before = {
        (FORWARD, up): (FORWARD, down),
        (INPUT_GRAD, down): (FORWARD, down),
        (INPUT_GRAD, up): (FORWARD, up),
        (WEIGHT_GRAD, down): (INPUT_GRAD, down),
        (WEIGHT_GRAD, up): (INPUT_GRAD, up),
    }

    def run(*steps: tuple[str, int]) -> None:
        for step in steps:
            limit = done[before[step]] if step in before else m
            if done[step] < limit:
                program.append(Action(step[0], step[1], done[step]))
                done[step] += 1

    f_down, f_up = (FORWARD, down), (FORWARD, up)
    i_down, i_up, w_down, w_up = (INPUT_GRAD, down), (INPUT_GRAD, up), (WEIGHT_GRAD, down), (WEIGHT_GRAD, up)
    run(*[f_down] * (2 * (p - rank) - 1))  # warm-up
    run(*[f_up, f_down] * rank)
    run(*[f_up, i_up, w_up] * (p - rank))
    while done[f_up] < done[f_down] or done[f_down] < m:  # steady state
        run(f_down, i_down, w_down, f_up, i_up, w_up)
    run(*[i_down, i_up] * rank)  # cool-down: W deferred into the tail
    run(*[i_down, w_down] * (p - rank))
    run(*[i_up, w_up] * m)
    run(*[i_down, w_down] * m)
    return tuple(action for action in program if action.microbatch < n_microbatches)


def zb_v(n_ranks: int, n_stages: int, n_microbatches: int) -> Schedule:
    """ZB-V: two stages per rank in a V (rank ``r`` holds ``r`` and ``2p - 1 - r``). Any ``m >= 1``."""
    if n_stages != 2 * n_ranks:
        raise ValueError(
            f"zb-v places two stages per rank (rank r holds stages r and {2 * n_ranks} - 1 - r), but the "
            f"pipe has {n_stages} stages for {n_ranks} ranks: cut the model into {2 * n_ranks} stages "
            f"(pipeline(..., n_stages={2 * n_ranks})), or pass n_ranks={n_stages // 2} to simulate"
        )
    p, m = n_ranks, n_microbatches
    placement = [0] * n_stages
    for rank in range(p):
        placement[rank] = placement[2 * p - 1 - rank] = rank
    ranks = tuple(_zb_v_rank(rank, p, m) for rank in range(p))
    return Schedule(ranks, n_stages, n_microbatches, tuple(placement), name="zb-v")
