"""Benchmark ``planner``: does ``conveyor plan``'s prediction hold on workloads it was not tuned on?

For each workload (balanced and unbalanced MLPs, the demo's character transformer, GPT-2 from
its config with random weights, a model whose last stage is a 16k-token vocabulary head) at 2
and 4 ranks: profile and plan as ``conveyor plan`` does, then run (``plan --verify``) the top 3
runnable candidates, the best synchronous, asynchronous and replicated ones and the pick of the
model before issue 20 (no optimizer step, no weight copies, no confidence column), and put
measured step times beside both models' predictions.

A measured step is ``runner.step`` and the optimizer step (synchronous) or the time between
consecutive batches' last losses (asynchronous); the model before issue 20 predicted a
synchronous step without its optimizer step and is compared with ``runner.step`` alone, as its
``--verify`` measured it. Every candidate is measured twice, in two separate runs (all candidates,
then all again), and the *measured* step is the mean of the two; the workload is also profiled and
planned a second time. *Floor*: the two measurements' difference over their mean plus the two
predictions' difference over the first: what two identical runs of ``plan`` and ``--verify``
differ by on this machine, so an error inside it cannot be told from noise. *Regret*: how much
slower the top pick ran than the fastest candidate measured for that workload (and than the fastest
of those not flagged *low*, which the planner ranks after the others). *Spread*: (slowest
- fastest) / median over a candidate's own steps in the first run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from conveyor.cli_plan import plan_workload
from conveyor.planning import Plan as CandidatePlan
from conveyor.planning import plan
from conveyor.planning.verify import Verified, verify
from conveyor.workloads import WorkloadSpec

from .harness import Plan
from .report import Section, Table

__all__ = ["WORKLOADS", "run"]

HERE = Path(__file__).resolve().parent / "plan_workloads"
WORKLOADS: list[tuple[str, WorkloadSpec]] = [
    ("MLP, cost in its last layers (issue 20)", WorkloadSpec(str(HERE / "mlp_unbalanced.py"))),
    ("MLP, 8 equal layers", WorkloadSpec(str(HERE / "mlp_balanced.py"))),
    ("demo character transformer", WorkloadSpec("demo")),
    ("GPT-2 (4 layers, width 128, random init)", WorkloadSpec("gpt2")),
    ("16k-token vocabulary head", WorkloadSpec(str(HERE / "vocab_head.py"))),
]


def kind(candidate: Any) -> str:
    if candidate.replicas and any(r > 1 for r in candidate.replicas):
        return "replicated"
    return "asynchronous" if candidate.is_async else "synchronous"


def _before(result: CandidatePlan) -> CandidatePlan:
    """The same profile priced as before issue 20: no optimizer step or weight copy, every class
    trusted alike (ranked by throughput among what fits and runs)."""
    profile = replace(result.profile, blocks=[replace(b, update_s=0.0, stash_s=0.0) for b in result.profile.blocks],
                      in_stream={})
    old = plan(profile, result.n_ranks, batch_size=result.batch_size,
               reshare=result.reshare)
    old.candidates.sort(key=lambda c: (not c.fits, not c.runnable, -c.throughput))
    return old


def _key(candidate: Any) -> tuple:
    return candidate.schedule, candidate.sizes, candidate.replicas, candidate.n_microbatches


def _chosen(result: CandidatePlan, before: CandidatePlan, top: int) -> list[Any]:
    runnable = [c for c in result.candidates if c.runnable and c.fits]
    chosen = runnable[:top]
    for name in ("synchronous", "asynchronous", "replicated"):
        best = next((c for c in runnable if kind(c) == name), None)
        if best is not None and best not in chosen:
            chosen.append(best)
    old_pick = next((c for c in before.candidates if c.runnable and c.fits), None)
    if old_pick is not None:
        match = next((c for c in result.candidates if _key(c) == _key(old_pick)), None)
        if match is not None and match not in chosen:
            chosen.append(match)
    return chosen


def _spread(row: dict[str, Any]) -> str:
    return "-" if row.get("spread") is None else f"{row['spread']:.0%}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def measure(top: int = 3, steps: int = 3, ranks: tuple[int, ...] = (2, 4),
            workloads: list[tuple[str, WorkloadSpec]] | None = None, runs: int = 3) -> list[dict[str, Any]]:
    """One row per verified candidate (see the module docstring)."""
    rows = []
    for name, spec in workloads or WORKLOADS:
        for n_ranks in ranks:
            started = time.perf_counter()
            result = plan_workload(spec, n_ranks, batch_size=None, memory_per_rank=None, runs=runs)
            before = _before(result)
            old = {_key(c): c for c in before.candidates}
            old_pick = next((c for c in before.candidates if c.runnable and c.fits), None)
            reshared = {_key(c): c for c in plan(result.profile, n_ranks, batch_size=result.batch_size,
                                                 reshare=True).candidates} if result.profile.concurrent > 1 else {}
            chosen = _chosen(result, before, top)
            subset = CandidatePlan(chosen, result.n_ranks, result.batch_size, None, result.profile)
            verified: list[Verified] = verify(subset, spec, top=len(chosen), steps=steps)
            # the floor: the same candidates measured again, and the workload profiled and planned again
            again = verify(subset, spec, top=len(chosen), steps=steps)
            replanned = {_key(c): c for c in plan_workload(spec, n_ranks, batch_size=None, memory_per_rank=None,
                                                            runs=runs).candidates}
            for index, (v, w) in enumerate(zip(verified, again)):
                c = v.candidate
                previous = old.get(_key(c))
                old_measured = v.measured_without_optimizer_s or v.measured_step_s
                both = [m for m in (v.measured_step_s, w.measured_step_s) if m is not None]
                measured = statistics.mean(both) if both else None
                second = replanned.get(_key(c))
                rows.append({
                    "workload": name, "ranks": n_ranks, "label": c.label(), "kind": kind(c),
                    "confidence": c.confidence, "rank": result.candidates.index(c) + 1, "in_top": index < top,
                    "predicted": c.step_s, "measured": measured,
                    "error": (c.step_s - measured) / measured if measured else None, "spread": v.spread,
                    "measured_first": v.measured_step_s, "measured_again": w.measured_step_s,
                    "measure_repeat": abs(both[0] - both[1]) / measured if len(both) == 2 else None,
                    "in_stream": dict(result.profile.in_stream),
                    "predicted_again": second.step_s if second else None,
                    "predict_repeat": abs(second.step_s - c.step_s) / c.step_s if second else None,
                    "old_predicted": previous.step_s if previous else None,
                    "old_error": (previous.step_s - old_measured) / old_measured if previous and old_measured else None,
                    "old_pick": old_pick is not None and _key(c) == _key(old_pick), "pick": c is result.candidates[0],
                    "seconds": time.perf_counter() - started, "load": os.getloadavg()[0],
                    "reshared_predicted": reshared[_key(c)].step_s if _key(c) in reshared else None,
                })
            log = os.environ.get("PLANNER_BENCH_LOG")
            if log:  # rows as they come, so that an interrupted run keeps what it measured
                with open(log, "a") as handle:
                    for row in rows[-len(verified):]:
                        handle.write(json.dumps(row) + "\n")
            print(f"bench planner: {name}, {n_ranks} ranks: {len(verified)} candidates in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)
    return rows


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _factors(row: dict[str, Any]) -> str:
    factors = row.get("in_stream") or {}
    return " / ".join(f"{factors[k]:.2f}" if k in factors else "-" for k in "FBUS")


def floor(row: dict[str, Any]) -> float | None:
    """What two identical runs of ``plan`` and ``--verify`` differ by for this candidate: the
    measured step's repeat plus the prediction's repeat (another profile of the same workload)."""
    if row.get("measure_repeat") is None or row.get("predict_repeat") is None:
        return None
    return row["measure_repeat"] + row["predict_repeat"]


def summarise_rows(rows: list[dict[str, Any]]) -> tuple[Table, Table, list[str]]:
    detail = Table(["workload", "ranks", "#", "candidate", "class", "confidence", "predicted ms", "measured ms",
                    "error", "measured, two runs ms", "predicted again ms", "floor", "spread",
                    "before: predicted ms", "before: error"])
    summary = Table(["workload", "ranks", "confidence of the top 3", "worst abs error, top 3", "widest floor, top 3",
                     "top pick regret", "regret among the not-low", "in-stream F / B / U / S",
                     "before: worst abs error", "before: top pick regret"])
    worst_all, worst_old_all, regrets, trusted_regrets, old_regrets = [], [], [], [], []
    for (name, n_ranks) in dict.fromkeys((r["workload"], r["ranks"]) for r in rows):
        group = [r for r in rows if r["workload"] == name and r["ranks"] == n_ranks and r["measured"]]
        for r in group:
            marks = (" (pick)" if r["pick"] else "") + (" (before: pick)" if r["old_pick"] else "")
            detail.rows.append([name, str(n_ranks), str(r["rank"]), r["label"] + marks, r["kind"], r["confidence"],
                                _ms(r["predicted"]), _ms(r["measured"]), _pct(r["error"]),
                                f"{_ms(r.get('measured_first'))} / {_ms(r.get('measured_again'))}",
                                _ms(r.get("predicted_again")), _share(floor(r)), _spread(r),
                                _ms(r["old_predicted"]), _pct(r["old_error"])])
        if not group:
            continue
        fastest = min(r["measured"] for r in group)
        top = [r for r in group if r["in_top"]]
        worst = max((abs(r["error"]) for r in top), default=float("nan"))
        widest = max((f for f in map(floor, top) if f is not None), default=float("nan"))
        worst_old = max((abs(r["old_error"]) for r in group if r["old_error"] is not None), default=float("nan"))
        pick = next((r for r in group if r["pick"]), None)
        old_pick = next((r for r in group if r["old_pick"]), None)
        regret = pick["measured"] / fastest - 1 if pick else float("nan")
        # against the candidates the planner does not flag low (it ranks those after the others)
        trusted = min((r["measured"] for r in group if r["confidence"] != "low"), default=fastest)
        trusted_regret = pick["measured"] / trusted - 1 if pick else float("nan")
        old_regret = old_pick["measured"] / fastest - 1 if old_pick else float("nan")
        worst_all.append(worst)
        worst_old_all.append(worst_old)
        regrets.append(regret)
        trusted_regrets.append(trusted_regret)
        old_regrets.append(old_regret)
        summary.rows.append([name, str(n_ranks), "/".join(sorted({r["confidence"] for r in top})), f"{worst:.1%}",
                             f"{widest:.0%}", f"{regret:.1%}", f"{trusted_regret:.1%}", _factors(group[0]),
                             f"{worst_old:.1%}", f"{old_regret:.1%}"])
    loads = [r["load"] for r in rows]
    by_ranks = []
    for n_ranks in sorted({r["ranks"] for r in rows}):
        top = [r for r in rows if r["ranks"] == n_ranks and r["in_top"] and r["measured"]]
        if not top:
            continue
        errors = sorted(abs(r["error"]) for r in top)
        measure_repeats = sorted(r["measure_repeat"] for r in top if r.get("measure_repeat") is not None)
        predict_repeats = sorted(r["predict_repeat"] for r in top if r.get("predict_repeat") is not None)
        beyond = [r for r in top if floor(r) is not None and abs(r["error"]) > max(0.15, floor(r))]
        by_ranks.append(f"{n_ranks} ranks: top-3 |error| median {statistics.median(errors):.1%}, "
                        f"worst {errors[-1]:.1%}; measured twice, the same candidate's steps differed by a median "
                        f"{statistics.median(measure_repeats):.0%} (widest {measure_repeats[-1]:.0%}); profiled "
                        f"twice, its prediction by {statistics.median(predict_repeats):.0%} (widest "
                        f"{predict_repeats[-1]:.0%}); {len(beyond)} of {len(top)} miss by more than both 15 % "
                        f"and their floor."
                        if measure_repeats and predict_repeats else f"{n_ranks} ranks: no repeats measured.")
    notes = [f"Worst |error| of a top-3 candidate: {max(worst_all):.1%} (before: worst |error| "
             f"over the same runs {max(worst_old_all):.1%}); top-pick regret: worst {max(regrets):.1%}, median "
             f"{statistics.median(regrets):.1%}; among candidates not flagged low: worst "
             f"{max(trusted_regrets):.1%}, median {statistics.median(trusted_regrets):.1%} (before: worst "
             f"{max(old_regrets):.1%}, median "
             f"{statistics.median(old_regrets):.1%}). One-minute load average during the runs: "
             f"{min(loads):.1f} to {max(loads):.1f}.", *by_ranks] if rows else []
    return detail, summary, notes


def run(plan_: Plan, figures: Path) -> Section:
    started = time.perf_counter()
    quick = plan_.rounds == 1 and plan_.min_steps == 1
    from .planner_terms import terms_table

    ranks = tuple(int(r) for r in os.environ.get("PLANNER_BENCH_RANKS", "2,4").split(","))
    chosen = [WORKLOADS[int(i)] for i in os.environ.get("PLANNER_BENCH_WORKLOADS", "0,1,2,3,4").split(",")]
    steps = int(os.environ.get("PLANNER_BENCH_STEPS", "3"))
    terms = Table(["term"])
    if quick:
        rows = measure(top=1, steps=1, ranks=(2,), workloads=WORKLOADS[:1], runs=1)
    else:
        if os.environ.get("PLANNER_BENCH_TERMS", "1") == "1":
            terms = terms_table(WORKLOADS)
        rows = measure(steps=steps, ranks=ranks, workloads=chosen)
    detail, summary, notes = summarise_rows(rows)
    return Section("planner", "14. Planner accuracy: predicted vs measured step (plan --verify)",
                   text=[(__doc__ or "").split("\n\n", 1)[1].strip()],
                   tables=[summary, detail] + ([terms] if terms.rows else []), notes=notes,
                   seconds=time.perf_counter() - started, short="planner")
