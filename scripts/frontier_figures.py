"""Draw the issue-19 schedules for docs/schedules.md: each one's simulated step on 4 ranks with 8
micro-batches (F = I = W = 1 per stage, a full backward B = 2) as a PNG in docs/figures and as a
text grid (one column per time unit) printed to stdout, with its peaks and idle time."""

from __future__ import annotations

import sys
from pathlib import Path

from conveyor.schedule import simulate
from conveyor.schedule.render import render_timeline

RANKS, MICROBATCHES = 4, 8
COSTS = {"F": 1.0, "I": 1.0, "W": 1.0, "B": 2.0}
SCHEDULES = [("zb-h2", 4), ("zb-v", 8), ("v-min", 8), ("v-half", 8), ("dualpipev", 8)]


def text_grid(result) -> str:  # noqa: ANN001 - a SimulationResult
    """One row per rank, one 4-character column per time unit: ``<stage><kind><mb>``, wide actions
    continued with ``~``, idle units ``.``; lower case for the second stage of a V rank."""
    width = int(round(result.makespan))
    rows = []
    for rank in range(result.n_ranks):
        cells = ["  . "] * width
        first = min(result.schedule.stages_of(rank))
        for event in (e for e in result.events if e.rank == rank):
            kind = event.action.kind if event.action.stage == first else event.action.kind.lower()
            start, end = int(round(event.start)), int(round(event.end))
            cells[start] = f"{kind}{event.action.microbatch}".rjust(3) + " "
            for unit in range(start + 1, end):
                cells[unit] = "  ~ "
        rows.append(f"rank {rank}: " + "".join(cells).rstrip())
    return "\n".join(rows)


def main(out: Path) -> None:
    for name, n_stages in SCHEDULES:
        result = simulate(name, n_stages, MICROBATCHES, COSTS, n_ranks=RANKS)
        idle = [result.makespan - busy for busy in result.busy]
        render_timeline(result, out / "figures" / f"{name}-simulated.png",
                        title=f"{name}: {RANKS} ranks, {n_stages} stages, {MICROBATCHES} micro-batches (simulated)")
        print(f"{name}: makespan {result.makespan:g}, bubble {result.bubble:.3f}, idle per rank "
              f"{' '.join(f'{i:g}' for i in idle)}, rank peak {' '.join(map(str, result.rank_peak_activations))}")
        print(text_grid(result), end="\n\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs"))
