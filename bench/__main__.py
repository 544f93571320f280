"""``python -m bench [--quick] [--only NAME ...] [--out BENCHMARKS.md]``: run the benchmarks, write the report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from . import (
    asynchronous,
    auto_schedule,
    compute,
    efficiency,
    generation,
    memory,
    mesh,
    moe_pairs,
    overhead,
    planner_accuracy,
    scaling,
)
from .harness import FULL, QUICK, Plan, busy_cpu_seconds
from .report import Section, write_report

Runner = Callable[[Plan, Path], Section]

BENCHMARKS: dict[str, Runner] = {
    "overhead": overhead.run,
    "efficiency": efficiency.run,
    "mlp": lambda plan, figures: compute.run(plan, figures, "mlp", 3),
    "transformer": lambda plan, figures: compute.run(plan, figures, "transformer", 4),
    "memory": memory.run,
    "scaling": scaling.run,
    "async": asynchronous.run,
    "pairs": moe_pairs.run,
    "auto": auto_schedule.run,
    "mesh": mesh.run,
    "generation": generation.run,
    "planner": planner_accuracy.run,  # minutes: profiles and runs ~60 configurations; only when named
}
ON_REQUEST = {"planner"}  # left out of a plain `python -m bench`: run with --only planner

FULL_RUN_ONLY = {"generation"}  # too slow for --quick's smoke run; `--only generation --quick` runs it small

PACKAGE = Path(__file__).resolve().parent
RECORDED_GPU = PACKAGE / "gpu_results.md"  # bench/gpu_check.py output from a lent GPU machine


def _settle(limit: float, threshold: float = 0.15) -> None:
    """Wait (at most ``limit`` s) for a second in which other processes use under ``threshold`` of the CPUs."""
    import os

    if limit <= 0:
        return
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = busy_cpu_seconds()
        time.sleep(1.0)
        after = busy_cpu_seconds()
        if before is None or after is None or (after - before) / (os.cpu_count() or 1) < threshold:
            return
    print(f"bench: the machine stayed busy for {limit:g} s; measuring anyway", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny versions of everything (a smoke test)")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")
    parser.add_argument("--out", type=Path, default=Path("BENCHMARKS.md"), help="report path (Markdown)")
    parser.add_argument("--figures", type=Path, default=None,
                        help="folder for PNG charts (default: bench/figures when the report goes to the "
                             "repository root, else <report folder>/figures)")
    parser.add_argument("--settle", type=float, default=None,
                        help="seconds to wait before each benchmark for other processes to go quiet "
                             "(default 10, 0 with --quick)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    out = args.out.resolve()
    figures = args.figures or (PACKAGE / "figures" if out.parent == PACKAGE.parent else out.parent / "figures")
    settle = args.settle if args.settle is not None else (0.0 if args.quick else 10.0)
    names = args.only or [name for name in BENCHMARKS
                          if name not in ON_REQUEST and not (args.quick and name in FULL_RUN_ONLY)]
    started = time.perf_counter()
    sections = []
    for name in names:
        _settle(settle)
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        section = BENCHMARKS[name](plan, figures)
        print(f"bench: {name} done in {section.seconds:.0f} s", file=sys.stderr, flush=True)
        sections.append(section)
    if RECORDED_GPU.exists() and not args.quick and args.only is None:
        sections.append(Section("gpu", "8. GPU (recorded on a lent machine, not by this command)",
                                text=[RECORDED_GPU.read_text().strip()]))
    command = "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv)
    write_report(out, sections, quick=args.quick, command=command.strip(), seconds=time.perf_counter() - started)
    print(f"bench: wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
