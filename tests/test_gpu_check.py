"""Smoke tests of bench/gpu_check.py and bench/gpu_profile.py: their CPU dry runs run the same
code as on a GPU (local mode, two host-staged processes, the GPT-2 timing) and write their
reports. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_dry_run_checks_every_mode_and_writes_the_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.md"
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--cpu-dry-run", "--gpt2", "builtin",
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    report = out.read_text()
    assert "## GPU check: CPU (dry run)" in report
    assert "all OK" in report and "MISMATCH" not in report
    for schedule in ("gpipe", "1f1b", "zb-h1"):
        assert f"| 2 processes (cpu, HostStagedTransport) | {schedule} |" in report
    for workload in ("no-work", "gpt2"):
        for mode in ("unsplit", "unsplit, 4 micro-batches accumulated", "local (1 process, 2 streams)",
                     "2 processes, host-staged"):
            assert f"| {workload} | {mode} |" in report


def test_profile_dry_run_times_every_mode_and_writes_the_tables(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path)}
    result = subprocess.run([sys.executable, "bench/gpu_profile.py", "--cpu-dry-run"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    text = (tmp_path / "gpu_profile.txt").read_text()
    for row in ("unsplit, whole batch", "unsplit, 4 micro-batches accumulated", "local pipeline",
                "2 processes, host-staged"):
        assert row in text
    assert "--- rank 1 of 2 host-staged processes" in text
