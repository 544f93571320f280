"""Smoke test of the benchmark harness: ``python -m bench --quick`` runs and writes every section.

No timing is asserted: performance claims live in BENCHMARKS.md, not in tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SECTIONS = [
    "# Benchmarks: conveyor vs torch.distributed.pipelining",
    "## 1. Runtime overhead",
    "## 2. Schedule efficiency",
    "## 3. Real compute on 2 cores: mlp",
    "## 4. Real compute on 2 cores: transformer",
    "## 5. Activation memory",
    "## 6. Scaling with micro-batches and stages",
    "## 7. Asynchronous pipelines",
    "## 11. Pipelines on a device mesh",
]


def test_quick_benchmark_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    result = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = out.read_text()
    for heading in SECTIONS:
        assert heading in report, f"{heading!r} missing from the report:\n{report[:2000]}"
    for field in ("**torch**", "**cores**", "**date**", "median", "ours / torch (paired)", "ours / ideal"):
        assert field in report
    for figure in ("efficiency.png", "memory.png", "scaling.png"):
        assert (tmp_path / "figures" / figure).exists(), figure
