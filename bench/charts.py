"""Figures for the report (matplotlib, Agg; PNG). Each function returns the file's path, or None
when matplotlib is missing or the figure cannot be drawn (the report then goes without it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["ratio_bars", "timeline", "time_bars"]


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib's Figure, imported lazily
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def ratio_bars(rows: Sequence[tuple[str, float, float]], path: Path, ylabel: str,
               targets: Sequence[float] | None = None, reference: float = 1.0, base: float = 0.0) -> str | None:
    """Grouped bars ``(label, conveyor, torch)`` rising from ``base``, a line at ``reference`` and
    markers at ``targets``."""
    try:
        figure = _figure(max(4.0, 1.4 * len(rows) + 1.5), 3.2)
    except ImportError:
        return None
    axes = figure.add_subplot()
    xs = range(len(rows))
    axes.bar([x - 0.2 for x in xs], [r[1] - base for r in rows], width=0.4, bottom=base, label="conveyor",
             color="tab:blue")
    axes.bar([x + 0.2 for x in xs], [r[2] - base for r in rows], width=0.4, bottom=base,
             label="torch.distributed.pipelining", color="tab:orange")
    if targets:
        axes.scatter(list(xs), list(targets), marker="_", s=600, color="black", label="target", zorder=3)
    axes.axhline(reference, color="grey", linewidth=0.8)
    values = [v for r in rows for v in r[1:]] + list(targets or []) + [reference]
    axes.set_ylim(min([base, *values]), max(values) * 1.08)
    axes.set_xticks(list(xs), [r[0] for r in rows])
    axes.set_ylabel(ylabel)
    axes.legend(fontsize=7, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return str(path)


def time_bars(rows: Sequence[tuple[str, float, float, float]], path: Path, ylabel: str) -> str | None:
    """Bars ``(label, median, min, max)`` with min-max whiskers (values in seconds, drawn in ms)."""
    try:
        figure = _figure(max(4.0, 1.1 * len(rows) + 1.5), 3.2)
    except ImportError:
        return None
    axes = figure.add_subplot()
    xs = list(range(len(rows)))
    medians = [r[1] * 1e3 for r in rows]
    errors = [[(r[1] - r[2]) * 1e3 for r in rows], [(r[3] - r[1]) * 1e3 for r in rows]]
    colours = ["tab:blue" if "conveyor" in r[0] else "tab:orange" if "torch" in r[0] else "tab:grey" for r in rows]
    axes.bar(xs, medians, yerr=errors, capsize=3, color=colours)
    axes.set_xticks(xs, [r[0] for r in rows], fontsize=7, rotation=20, ha="right")
    axes.set_ylabel(ylabel)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return str(path)


def timeline(rows: Sequence[tuple[int, str, float, float]], path: Path, title: str) -> str | None:
    """A measured step as a pipeline timeline (conveyor's renderer), times in seconds from its start."""
    if not rows:
        return None
    try:
        from conveyor.schedule.render import render_timeline

        return str(render_timeline(list(rows), path, title=title))
    except ImportError:
        return None
