"""Figures for the report (matplotlib, Agg; PNG). Each function returns the file's path, or None
when matplotlib is missing or the figure cannot be drawn (the report then goes without it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["memory_bars", "memory_timelines", "ratio_bars", "scaling_lines", "timeline", "time_bars"]


def _figure(width: float, height: float):  # noqa: ANN202 - matplotlib's Figure, imported lazily
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


_SERIES = (("conveyor", "tab:blue"), ("torch.distributed.pipelining", "tab:orange"),
           ("hand-written floor", "tab:grey"))


def ratio_bars(rows: Sequence[tuple[float | str, ...]], path: Path, ylabel: str,
               targets: Sequence[float] | None = None, reference: float = 1.0, base: float = 0.0,
               series: Sequence[tuple[str, str]] = _SERIES) -> str | None:
    """Grouped bars ``(label, conveyor, torch[, floor])`` (or one value per ``series``: name,
    colour) rising from ``base``, a line at ``reference`` and markers at ``targets``."""
    try:
        figure = _figure(max(4.0, 1.4 * len(rows) + 1.5), 3.2)
    except ImportError:
        return None
    axes = figure.add_subplot()
    xs = range(len(rows))
    count = len(rows[0]) - 1 if rows else 0
    width = 0.8 / max(count, 1)
    for index, (label, colour) in enumerate(series[:count]):
        offset = (index - (count - 1) / 2) * width
        axes.bar([x + offset for x in xs], [float(r[index + 1]) - base for r in rows], width=width, bottom=base,
                 label=label, color=colour)
    if targets:
        axes.scatter(list(xs), list(targets), marker="_", s=600, color="black", label="target", zorder=3)
    axes.axhline(reference, color="grey", linewidth=0.8)
    values = [float(v) for r in rows for v in r[1:]] + list(targets or []) + [reference]
    axes.set_ylim(min([base, *values]), max(values) * 1.08)
    axes.set_xticks(list(xs), [str(r[0]) for r in rows])
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


def memory_bars(groups: dict[str, Sequence[tuple[float, float | None, float]]], path: Path,
                ylabel: str) -> str | None:
    """One panel per schedule: per stage, bars ``(conveyor, torch or None)`` and a marker at the bound."""
    if not groups:
        return None
    try:
        figure = _figure(max(4.0, 2.6 * len(groups) + 0.8), 3.0)
    except ImportError:
        return None
    top = max(max(v for v in row if v is not None) for rows in groups.values() for row in rows) * 1.12
    for index, (name, rows) in enumerate(groups.items()):
        axes = figure.add_subplot(1, len(groups), index + 1)
        xs = list(range(len(rows)))
        axes.bar([x - 0.2 for x in xs], [r[0] for r in rows], width=0.4, color="tab:blue", label="conveyor")
        axes.bar([x + 0.2 for x in xs], [r[1] or 0.0 for r in rows], width=0.4, color="tab:orange",
                 label="torch.distributed.pipelining")
        axes.scatter(xs, [r[2] for r in rows], marker="_", s=500, color="black", label="bound", zorder=3)
        axes.set_title(name, fontsize=9)
        axes.set_xticks(xs, [f"stage {x}" for x in xs], fontsize=7)
        axes.set_ylim(0, top)
        if index == 0:
            axes.set_ylabel(ylabel)
            handles, labels = axes.get_legend_handles_labels()
    figure.legend(handles, labels, fontsize=7, loc="upper center", ncol=3, frameon=False)
    figure.tight_layout(rect=(0, 0, 1, 0.9))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return str(path)


def memory_timelines(groups: dict[str, Sequence[Sequence[tuple[float, float]]]], path: Path,
                     title: str) -> str | None:
    """One panel per schedule: per stage, live bytes over the step (steps drawn as stairs, in MiB)."""
    if not groups:
        return None
    try:
        figure = _figure(max(4.0, 2.6 * len(groups) + 0.8), 2.8)
    except ImportError:
        return None
    top = max((v for stages in groups.values() for events in stages for _, v in events), default=1.0) / 2 ** 20
    for index, (name, stages) in enumerate(groups.items()):
        axes = figure.add_subplot(1, len(groups), index + 1)
        for stage, events in enumerate(stages):
            if events:
                axes.step([t * 1e3 for t, _ in events], [v / 2 ** 20 for _, v in events], where="post",
                          label=f"stage {stage}", linewidth=1)
        axes.set_title(name, fontsize=9)
        axes.set_xlabel("ms into the step", fontsize=7)
        axes.set_ylim(0, top * 1.08)
        axes.tick_params(labelsize=7)
        if index == 0:
            axes.set_ylabel("MiB", fontsize=8)
            axes.legend(fontsize=6, loc="upper right")
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return str(path)


def scaling_lines(panels: Sequence[tuple[str, str, Sequence[int], dict[str, Sequence[float | None]]]], path: Path,
                  columns: int = 2) -> str | None:
    """Panels ``(x label, y label, xs, {series: ys})`` on a grid of ``columns``; a series named
    ``simulator...`` is a black line, ``conveyor ...`` blue and ``torch ...`` orange (solid gpipe,
    dashed 1f1b); a None y is left out; x on a log2 axis."""
    try:
        figure = _figure(4.6 * columns, 3.2 * -(-len(panels) // columns))
    except ImportError:
        return None
    rows = -(-len(panels) // columns)
    for index, (xlabel, ylabel, xs, series) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        for name, ys in series.items():
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if not points:
                continue
            if name.startswith("simulator"):
                style: dict = {"color": "black", "linewidth": 1.2, "linestyle": ":" if "calibrated" in name else "-"}
            else:
                style = {"color": "tab:blue" if name.startswith("conveyor") else "tab:orange",
                         "linestyle": "--" if "1f1b" in name else "-", "marker": "o" if "1f1b" in name else "s",
                         "markersize": 4, "linewidth": 1}
            axes.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
        axes.set_xscale("log", base=2)
        axes.set_xticks(list(xs), [str(x) for x in xs])
        axes.set_xlabel(xlabel, fontsize=8)
        axes.set_ylabel(ylabel, fontsize=8)
        axes.tick_params(labelsize=7)
        axes.grid(True, linewidth=0.3)
        axes.legend(fontsize=6, loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return str(path)
