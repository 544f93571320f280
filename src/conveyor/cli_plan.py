"""``conveyor plan``: profile a workload, rank pipeline configurations, optionally run the top ones.

Also the workload arguments ``conveyor train`` shares (model source and sizes).
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Sequence

from .cli_args import at_least, positive_float
from .planning import Plan, Profile, plan, profile
from .planning.calibrate import calibrate as in_stream_factors
from .planning.profile import oversubscribed, profile_together
from .workloads import Workload, WorkloadSpec, load_workload

__all__ = ["add_workload_arguments", "parse_bytes", "plan_workload", "register", "schedule_list", "spec_from_args"]

CONTENTION = ("measured", "reshared", "modelled")
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(text: str) -> float:
    """``"8G"``, ``"512M"``, ``"1.5g"``, ``"1000000"`` -> bytes."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([kmgtKMGT]?)(i?[bB])?\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 8G, 512M or 1000000")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 8G, 512M or 1000000") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text!r}")
    return value


def add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", nargs="?", default="demo",
                        help="'demo' (default), a training script (.py) or module defining build_model(), "
                             "batch(step, batch_size) and loss_fn(output, target), or a transformers model "
                             "type such as gpt2 (random init, no download)")
    parser.add_argument("--batch-size", type=at_least(1), default=None, help="rows per step (default: the workload's)")
    parser.add_argument("--layers", type=at_least(1), default=None, help="demo/transformers: number of blocks")
    parser.add_argument("--width", type=at_least(1), default=None, help="demo/transformers: hidden size")
    parser.add_argument("--heads", type=at_least(1), default=None, help="demo/transformers: attention heads")
    parser.add_argument("--seq-len", type=at_least(1), default=None, help="demo/transformers: sequence length")
    parser.add_argument("--full-size", action="store_true",
                        help="transformers: keep the config's default sizes (gpt2: GPT-2 small, 124M)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="initialisation and data seed (default 0)")


def spec_from_args(args: argparse.Namespace) -> WorkloadSpec:
    return WorkloadSpec(args.source, args.layers, args.width, args.heads, args.seq_len, args.full_size, args.seed)


def _profile_workload(workload: Workload, rows: int, runs: int, threads: int, link: str | None,
                      cpu_time: bool = False) -> Profile:
    inputs, target = workload.inputs(0, rows)
    return profile(workload.build_model(), inputs, target=target, loss_fn=workload.loss_fn, runs=runs,
                   threads=threads, link=link, name=workload.name, optimizer=workload.make_optimizer,
                   cpu_time=cpu_time)


def _profile_workload_rank(rank: int, world_size: int, spec: WorkloadSpec, rows: int, runs: int,
                           threads: int) -> Profile:
    """One of the processes profiling at once: it loads the workload itself (a user's script is
    imported here, under its own name, rather than unpickled)."""
    return _profile_workload(load_workload(spec), rows, runs, threads, None,
                             cpu_time=oversubscribed(world_size, threads))


def plan_workload(spec: WorkloadSpec, ranks: int, *, batch_size: int | None, memory_per_rank: float | None,
                  runs: int = 3, measure_link: bool = True, profile_file: str | None = None,
                  save_profile: str | None = None, contention: str = "reshared",
                  schedules: Sequence[str] | None = None, calibrate: bool = True) -> Plan:
    """Profile the workload with the threads each of ``ranks`` local ranks will get, then plan.

    ``contention="measured"`` profiles in ``ranks`` processes at once (sharing the cores, the
    memory bandwidth and whatever else loads the machine, as the run will; with fewer ranks than
    cores each process has a core of its own) and uses the times as measured; ``"reshared"``
    profiles the same way but divides out the processes' own sharing of too few cores and models
    it where ranks overlap; ``"modelled"`` profiles in one process and models the sharing.
    ``calibrate``: a freshly measured profile for several ranks then gets its in-stream factors
    from a short traced 1F1B run on the ranks (``planning/calibrate.py``)."""
    if contention not in CONTENTION:
        raise ValueError(f"contention={contention!r}: use one of {CONTENTION}")
    workload = load_workload(spec)
    batch_size = batch_size or workload.batch_size
    if profile_file:
        measured = Profile.load(profile_file)
    else:
        rows = batch_size  # profiled at the whole batch and down to an eighth: the m candidates use most
        cores = os.cpu_count() or 1
        threads = max(1, cores // ranks)
        concurrent = ranks if contention != "modelled" else 1
        link = "measure" if measure_link else None
        if concurrent > 1:  # every process builds the workload from its spec: a script's model cannot be pickled
            measured = profile_together(_profile_workload_rank, (spec, rows, runs, threads), concurrent,
                                        threads=threads, link=link, name=workload.name)
        else:
            measured = _profile_workload(workload, rows, runs, threads, link)
        if calibrate and ranks > 1:  # at the micro-batch size of the uncalibrated pick
            first = plan(measured, ranks, memory_per_rank=memory_per_rank, batch_size=batch_size,
                         reshare=contention == "reshared", schedules=schedules)
            pick = first.best_runnable or first.best
            measured.in_stream = in_stream_factors(measured, spec, ranks, batch_size,
                                                   n_microbatches=pick.n_microbatches)
    if save_profile:
        print(f"wrote {measured.save(save_profile)}")
    return plan(measured, ranks, memory_per_rank=memory_per_rank, batch_size=batch_size,
                reshare=contention == "reshared", schedules=schedules)


def _plan(args: argparse.Namespace) -> None:
    from .planning.verify import VERIFIED_HEADER, format_row, verify

    spec = spec_from_args(args)
    result = plan_workload(spec, args.ranks, batch_size=args.batch_size, memory_per_rank=args.memory_per_rank,
                           runs=args.runs, measure_link=not args.no_link, profile_file=args.profile,
                           save_profile=args.save_profile, contention=args.contention, schedules=args.schedules,
                           calibrate=not args.no_calibrate)
    verified = None
    if args.verify:
        chosen = result.top(args.top, runnable=True) if args.runnable_only else result.top(args.top)
        subset = Plan(chosen, result.n_ranks, result.batch_size, result.memory_per_rank, result.profile)
        if not args.json:
            print(result.table(args.top))
            print(result.explain())
            print(f"\nrunning the top {len(chosen)} for {args.steps} steps each on {args.ranks} local processes ...")
            print(VERIFIED_HEADER, flush=True)
        verified = verify(subset, spec, top=len(chosen), steps=args.steps, timeout=args.timeout,
                          on_result=None if args.json else
                          lambda index, result: print(format_row(index, result), flush=True))
    if args.json:
        print(result.to_json([v.to_dict() for v in verified] if verified is not None else None))
    elif not args.verify:
        print(result.table(args.top))
        print(result.explain())


def schedule_list(text: str) -> list[str]:
    """``"1f1b,zb-h1"`` -> ``["1f1b", "zb-h1"]``, each a schedule the planner knows."""
    from .planning.search import ASYNC_SCHEDULES, SYNC_SCHEDULES

    names = [name.strip() for name in text.split(",") if name.strip()]
    known = SYNC_SCHEDULES + ASYNC_SCHEDULES
    unknown = [name for name in names if name not in known]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown schedules {unknown or [text]}; choose from {', '.join(known)}")
    return names


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("plan", help="profile a model and rank split, schedule and micro-batch count",
                                 description="Profile a model (the demo by default) and rank pipeline "
                                             "configurations by predicted throughput.")
    add_workload_arguments(parser)
    parser.add_argument("--ranks", type=at_least(1), default=4, help="pipeline ranks (default 4)")
    parser.add_argument("--memory-per-rank", type=parse_bytes, default=None,
                        help="memory limit per rank, e.g. 8G (default: none)")
    parser.add_argument("--top", type=at_least(1), default=5,
                        help="rows of the table, candidates to verify (default 5)")
    parser.add_argument("--verify", action="store_true",
                        help="run the top candidates for a few steps: predicted vs measured step time")
    parser.add_argument("--runnable-only", action="store_true",
                        help="with --verify: verify the top candidates the runner accepts (skip those it refuses)")
    parser.add_argument("--steps", type=at_least(1), default=3,
                        help="measured steps per verified candidate (default 3)")
    parser.add_argument("--timeout", type=positive_float, default=600.0,
                        help="seconds per verified candidate (default 600)")
    parser.add_argument("--runs", type=at_least(1), default=3,
                        help="timed runs per block and batch size when profiling, at least (default 3; "
                        "small models are timed on until half a second)")
    parser.add_argument("--contention", choices=CONTENTION, default="reshared",
                        help="ranks sharing too few cores: profile them all at once, divide out their own "
                             "sharing and model it where ranks overlap (reshared, default), or use the times "
                             "as measured (measured), or profile in one process and model the sharing (modelled)")
    parser.add_argument("--no-calibrate", action="store_true",
                        help="do not run the short traced 1F1B pipeline that measures how much slower forwards, "
                             "backwards and the optimizer step run inside a pipeline than profiled alone")
    parser.add_argument("--no-link", action="store_true", help="do not measure the link (assume 50 us, 1 GB/s)")
    parser.add_argument("--profile", default=None, help="plan from a saved profile (JSON) instead of measuring")
    parser.add_argument("--save-profile", default=None, help="write the measured profile to this JSON file")
    parser.add_argument("--schedules", type=schedule_list, default=None,
                        help="search only these schedules, comma-separated, e.g. 1f1b,zb-h1,pipedream "
                             "(default: all)")
    parser.add_argument("--json", action="store_true",
                        help="print every candidate as JSON instead of the table (with --verify: and the "
                             "measured step, error and note of each verified candidate, under 'verified')")
    parser.set_defaults(handler=_plan)
