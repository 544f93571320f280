"""The report: sections of text, tables and figures, written as Markdown with a machine header."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .harness import Summary

__all__ = ["Section", "Table", "machine", "ms", "ratio", "summary_cells", "write_report"]


@dataclass
class Table:
    """A Markdown table: a header row and rows of already formatted cells."""

    headers: list[str]
    rows: list[list[str]] = field(default_factory=list)

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.headers) + " |", "|" + "|".join("---" for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's part of the report. ``text`` paragraphs come before the tables, ``notes``
    after them; ``figures`` are paths relative to the report's folder."""

    name: str
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    foreign: list[float] = field(default_factory=list)  # per block: CPU share other processes used
    redone: int = 0  # blocks measured again because other processes were busy
    headline: list[list[str]] = field(default_factory=list)  # [measure, ours, torch, ours vs torch]
    short: str = ""  # the benchmark's name in the summary table


def ms(seconds: float) -> str:
    """Seconds as milliseconds, with precision to match."""
    value = seconds * 1e3
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 100 else f"{value:.1f}"


def ratio(value: float) -> str:
    return f"{value:.3f}"


def summary_cells(summary: Summary, fmt: str = "ms") -> list[str]:
    """``[median, min, max]`` of ``summary`` as cells (``fmt`` "ms" or "ratio")."""
    format_one = ms if fmt == "ms" else ratio
    return [format_one(summary.median), format_one(summary.min), format_one(summary.max)]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> list[tuple[str, str]]:
    """What the numbers were measured on."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        ("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
        ("machine", f"{platform.node()} ({platform.system()} {platform.release()}, {platform.machine()})"),
        ("CPU", _cpu_model()),
        ("cores", f"{os.cpu_count()} logical, {affinity} usable by this process"),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]


def _interference(foreign: Sequence[float], redone: int) -> str:
    if not foreign:
        return ""
    ordered = sorted(foreign)
    again = f" {redone} blocks were measured again because other processes were busy." if redone else ""
    return (f"Other processes kept {100 * ordered[len(ordered) // 2]:.0f}% of the CPUs busy during a typical "
            f"kept block (worst {100 * ordered[-1]:.0f}%).{again}")


def write_report(path: Path, sections: Sequence[Section], *, quick: bool, command: str, seconds: float) -> Path:
    """Write the Markdown report to ``path``."""
    lines = ["# Benchmarks: conveyor vs torch.distributed.pipelining", ""]
    lines += [f"- **{key}**: {value}" for key, value in machine()]
    lines += [f"- **command**: `{command}` ({'quick smoke run: too few steps to trust' if quick else 'full run'}, "
              f"{seconds:.0f} s)", ""]
    lines += [
        "Both libraries run in the same processes of the same run, alternated block by block (the order "
        "rotating each round); a step is timed from the earliest rank's start to the latest rank's end, "
        "after a barrier. Medians, minima and maxima are over all timed steps; a *paired ratio* is taken per "
        "round (median of ours / median of torch's in that round) and the median over rounds is reported. "
        "Absolute times depend on this machine and move with the code; compare ratios.", ""]
    summary = Table(["benchmark", "measure", "conveyor", "torch", "conveyor vs torch (paired)"])
    for section in sections:
        summary.rows += [[section.short or section.name, *row] for row in section.headline]
    if summary.rows:
        lines += ["## Summary", "", summary.markdown(), ""]
    for section in sections:
        lines += [f"## {section.title}", ""]
        for paragraph in section.text:
            lines += [paragraph, ""]
        for table in section.tables:
            lines += [table.markdown(), ""]
        for note in section.notes:
            lines += [note, ""]
        for figure in section.figures:
            lines += [f"![{section.name}]({os.path.relpath(figure, path.parent)})", ""]
        lines += [f"_Section time: {section.seconds:.0f} s. {_interference(section.foreign, section.redone)}_", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path
