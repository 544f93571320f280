"""Pictures of a pipeline step: a timeline figure (PNG/SVG) and a Chrome-trace JSON (Perfetto).

Both take timed events, from :func:`simulate` (``result.events``, or the result itself) or from a
real run: any sequence of objects with ``rank``, ``action``, ``start``, ``end`` attributes, or of
plain tuples ``(rank, action_text, start_seconds, end_seconds)`` with action text like ``"0F3"``.

The figure follows the GPipe/PipeDream papers: one row per rank, one box per action, coloured by
micro-batch and numbered; F light, B dark, I medium, W hatched; bubbles are left blank::

    rank 0 | 0 | 1 |   |   |###|###|
    rank 1 |   | 0 | 1 |###|###|   |
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .actions import Action

__all__ = ["MATPLOTLIB_MISSING", "chrome_trace", "render_timeline", "require_matplotlib"]

TimedAction = tuple[int, str, float, float]

# how each kind is drawn: (mix towards white (+) or black (-), hatch)
_SHADES: dict[str, tuple[float, str]] = {"F": (0.45, ""), "B": (-0.25, ""), "I": (0.0, ""), "W": (0.55, "////"),
                                         "U": (-0.8, "..")}


def _normalise(events: Any) -> list[TimedAction]:
    events = getattr(events, "events", events)  # a SimulationResult
    rows: list[TimedAction] = []
    for event in events:
        if hasattr(event, "rank") and hasattr(event, "action"):
            rank, action, start, end = event.rank, event.action, event.start, event.end
        else:
            rank, action, start, end = event
        rows.append((int(rank), str(action), float(start), float(end)))
    return rows


def _parse(text: str) -> Action | None:
    try:
        return Action.parse(text)
    except ValueError:
        return None


def _n_ranks(rows: list[TimedAction], events: Any, n_ranks: int | None) -> int:
    if n_ranks is not None:
        return n_ranks
    from_result = getattr(events, "n_ranks", None)
    return from_result if isinstance(from_result, int) else 1 + max((r[0] for r in rows), default=0)


def _mix(rgb: tuple[float, ...], amount: float) -> tuple[float, ...]:
    target = 1.0 if amount > 0 else 0.0
    return tuple(c + (target - c) * abs(amount) for c in rgb[:3])


MATPLOTLIB_MISSING = ("drawing a timeline needs matplotlib, which is not installed: pip install 'conveyor[plot]' "
                      "(or write a Chrome trace: a .json name)")


def require_matplotlib() -> None:
    """Raise ``ModuleNotFoundError`` naming the ``plot`` extra when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ModuleNotFoundError(MATPLOTLIB_MISSING, name="matplotlib") from None


def render_timeline(events: Iterable[Any], path: str | Path, *, title: str | None = None,
                    n_ranks: int | None = None) -> Path:
    """Draw ``events`` as a pipeline timeline and write it to ``path`` (``.png``, ``.svg`` or ``.pdf``;
    needs matplotlib: ``pip install 'conveyor[plot]'``)."""
    require_matplotlib()
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in ("png", "svg", "pdf"):
        raise ValueError(f"cannot tell the image format of {str(path)!r}: end the name in .png, .svg or .pdf")
    rows = _normalise(events)
    ranks = _n_ranks(rows, events, n_ranks)
    t0 = min((r[2] for r in rows), default=0.0)
    span = max((r[3] for r in rows), default=1.0) - t0 or 1.0
    stages_on: dict[int, set[int]] = {}
    for rank, text, _, _ in rows:
        action = _parse(text)
        if action is not None:
            stages_on.setdefault(rank, set()).add(action.stage)
    per_rank = max((sum(1 for r in rows if r[0] == rank) for rank in range(ranks)), default=1)

    figure = Figure(figsize=(min(max(6.0, 0.32 * per_rank + 1.5), 40.0), 0.55 * ranks + 1.3))
    axes = figure.add_subplot()
    palette = colormaps["tab10"]
    for rank, text, start, end in rows:
        action = _parse(text)
        kind = action.kind if action is not None else ""
        shade, hatch = _SHADES.get(kind, (0.0, "xx"))
        base = palette(action.microbatch % 10) if action is not None else (0.6, 0.6, 0.6)
        box = Rectangle((start - t0, rank - 0.4), end - start, 0.8, facecolor=_mix(base, shade), hatch=hatch,
                        edgecolor="black", linewidth=0.5)
        axes.add_patch(box)
        if action is None:
            label = text
        elif len(stages_on.get(rank, ())) > 1:
            label = f"${action.microbatch}_{{{action.stage}}}$"
        else:
            label = str(action.microbatch)
        if action is not None and action.version is not None:  # weight stashing: the version it used
            label += f"\nv{action.version}"
        if (end - start) / span > 0.008:
            axes.text(start - t0 + (end - start) / 2, rank, label, ha="center", va="center", fontsize=7,
                      color="white" if shade < 0 else "black")
    axes.set_xlim(0, span)
    axes.set_ylim(ranks - 0.5, -0.5)
    axes.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    axes.set_xlabel("time")
    legend = [Patch(facecolor=_mix((0.5, 0.5, 0.5), s), hatch=h, edgecolor="black", label=k)
              for k, (s, h) in _SHADES.items() if any(_kind(r[1]) == k for r in rows)]
    if legend:
        axes.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format=fmt, dpi=150)
    return path


def _kind(text: str) -> str | None:
    action = _parse(text)
    return action.kind if action is not None else None


def chrome_trace(events: Iterable[Any], path: str | Path) -> Path:
    """Write ``events`` as Chrome-trace JSON (open in https://ui.perfetto.dev): one track per rank.

    Times are taken as seconds and written in microseconds, as the format expects.
    """
    path = Path(path)
    rows = _normalise(events)
    trace: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "pipeline"}}]
    for rank in sorted({r[0] for r in rows}):
        trace.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        trace.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for rank, text, start, end in rows:
        action = _parse(text)
        args = {"stage": action.stage, "microbatch": action.microbatch} if action is not None else {}
        trace.append({
            "name": text, "cat": action.kind if action is not None else "other", "ph": "X", "pid": 0, "tid": rank,
            "ts": start * 1e6, "dur": (end - start) * 1e6, "args": args,
        })
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"traceEvents": trace, "displayTimeUnit": "ms"}))
    return path
