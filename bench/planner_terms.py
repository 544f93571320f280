"""Where a step's time goes that the planner's model does not price: one candidate run with
``runner.trace`` (per action: start, end, time waited), decomposed into the terms of
docs/planning.md's table and compared with what the profile predicts.

Per synchronous step and rank: ``feed`` (from the barrier to the first action: splitting the
batch), each action's compute (``end - ready``) against the profiled ``F``/``B`` (the first
forward of a step apart: the cold start), the waits, the ``tail`` after the last action and the
optimizer step. Per asynchronous stream: each action kind's compute, the update ``U`` (optimizer
step and weight copy) against the profiled update and copy.
"""

from __future__ import annotations

import re
import statistics
import time
from collections import defaultdict
from typing import Any

import torch.distributed as dist

from conveyor.planning.costs import action_costs
from conveyor.planning.search import Candidate
from conveyor.planning.verify import candidate_runner, stream_batches, timed_steps
from conveyor.workloads import WorkloadSpec

__all__ = ["decompose", "traced_run"]

_ACTION = re.compile(r"(\d+)([A-Z])(\d+)")


def _worker(rank: int, world_size: int, spec: WorkloadSpec, schedule: str, sizes: tuple[int, ...],
            n_microbatches: int, batch_size: int, steps: int, replicas: tuple[int, ...] | None) -> dict[str, Any]:
    workload, runner, optimizer = candidate_runner(spec, schedule, sizes, n_microbatches, batch_size, replicas)
    if runner.schedule.is_streaming:
        batches = stream_batches(workload, batch_size, steps + 2)
        dist.barrier()
        start = time.perf_counter()
        for _ in runner.stream(batches, optimizer):
            pass
        return {"trace": list(runner.trace), "start": start, "end": time.perf_counter()}
    return {"steps": [{"start": t.start, "stepped": t.stepped, "end": t.end, "trace": t.trace}
                      for t in timed_steps(workload, runner, optimizer, batch_size, steps)]}


def traced_run(spec: WorkloadSpec, candidate: Candidate, batch_size: int, steps: int = 4,
               timeout: float = 600.0) -> list[dict[str, Any]]:
    from conveyor.launch import launch

    return launch(_worker, candidate.n_ranks, timeout=timeout,
                  args=(spec, candidate.schedule, candidate.sizes, candidate.n_microbatches, batch_size, steps,
                        candidate.replicas))


def decompose(per_rank: list[dict[str, Any]], candidate: Candidate, profile: Any) -> dict[str, float]:
    """Milliseconds per term, measured and (where the model has it) predicted."""
    costs = action_costs(profile, candidate.sizes, candidate.rows)
    predicted = {"F": costs.F, "B": costs.B, "I": costs.I, "W": costs.W}
    ratios: dict[str, list[float]] = defaultdict(list)
    terms: dict[str, list[float]] = defaultdict(list)

    def actions(trace: list) -> list[tuple[str, int, int, float, float, float]]:
        out = []
        for event in trace:
            match = _ACTION.match(event.action)
            if match:
                out.append((match.group(2), int(match.group(1)), int(match.group(3)), event.start, event.end,
                            event.waited))
        return out

    if "steps" in per_rank[0]:
        n_steps = len(per_rank[0]["steps"])
        for index in range(n_steps):
            records = [rank["steps"][index] for rank in per_rank]
            terms["step"].append(max(r["end"] for r in records) - min(r["start"] for r in records))
            for r in records:
                done = actions(r["trace"])
                if not done:
                    continue
                first_begin = done[0][3] - done[0][5]
                terms["feed"].append(first_begin - r["start"])
                terms["tail"].append(r["stepped"] - done[-1][4])
                terms["optimizer"].append(r["end"] - r["stepped"])
                terms["waited"].append(sum(a[5] for a in done))
                first_forward = {}
                for kind, stage, micro, ready, end, _ in done:
                    if kind in predicted and predicted[kind][stage] > 0:
                        if kind == "F" and stage not in first_forward:
                            first_forward[stage] = micro
                            ratios["F first"].append((end - ready) / predicted[kind][stage])
                        else:
                            ratios[kind].append((end - ready) / predicted[kind][stage])
        placement = candidate.placement
        per_rank_updates = defaultdict(float)
        for stage, rank in enumerate(placement):
            per_rank_updates[rank] += costs.U[stage]
        terms["optimizer predicted"].append(max(per_rank_updates.values()))
    else:
        for rank in per_rank:
            done = actions(rank["trace"])
            for kind, stage, _, ready, end, _ in done:
                if kind == "U":
                    terms["update"].append(end - ready)
                    terms["update predicted"].append(costs.U[stage] + costs.stash[stage])
                elif kind in predicted and predicted[kind][stage] > 0:
                    ratios[kind].append((end - ready) / predicted[kind][stage])
            terms["waited share"].append(sum(a[5] for a in done) / max(1e-9, rank["end"] - rank["start"]))
    out = {f"{k} ms": statistics.median(v) * 1e3 for k, v in terms.items() if "share" not in k}
    out.update({k: statistics.median(v) for k, v in terms.items() if "share" in k})
    out.update({f"{k} measured/profiled": statistics.median(v) for k, v in ratios.items()})
    return out


TERMS_CASES = [  # (workload index in planner_accuracy.WORKLOADS, ranks)
    (0, 2),
    (2, 4),
]


def terms_table(workloads: list[tuple[str, WorkloadSpec]], cases: list[tuple[int, int]] | None = None,
                steps: int = 4, runs: int = 3) -> Any:
    """One row per (workload, ranks, candidate): the best runnable synchronous and asynchronous
    candidates, each run traced and decomposed (:func:`decompose`)."""
    from conveyor.cli_plan import plan_workload

    from .report import Table

    table = Table(["workload", "ranks", "candidate", "predicted ms", "term", "measured", "model"])
    for index, n_ranks in cases or TERMS_CASES:
        name, spec = workloads[index]
        result = plan_workload(spec, n_ranks, batch_size=None, memory_per_rank=None, runs=runs)
        picks = [next((c for c in result.candidates if c.runnable and c.fits and c.is_async == asynchronous), None)
                 for asynchronous in (False, True)]
        for c in picks:
            if c is None:
                continue
            found = decompose(traced_run(spec, c, result.batch_size, steps=steps), c, result.profile)
            model = {"optimizer ms": found.get("optimizer predicted ms"), "update ms": found.get("update predicted ms")}
            for term, value in found.items():
                if term.endswith("predicted ms"):
                    continue
                expected = model.get(term)
                if term.endswith("measured/profiled"):
                    expected = 1.0
                elif term in ("feed ms", "tail ms", "waited ms", "step ms") and expected is None:
                    expected = c.step_s * 1e3 if term == "step ms" else 0.0
                table.rows.append([name, str(n_ranks), c.label(), f"{c.step_s * 1e3:.1f}", term, f"{value:.3f}",
                                   "-" if expected is None else f"{expected:.3f}"])
            table.rows.append([name, str(n_ranks), c.label(), f"{c.step_s * 1e3:.1f}", "runtime overhead per action ms",
                               "-", f"{result.profile.action_overhead_s * 1e3:.3f}"])
    return table
