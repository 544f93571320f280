"""A ``conveyor train`` workload for test_restart.py: the examples' MLP whose rank 1 SIGKILLs
itself once, when asked for the batch of step CONVEYOR_TEST_KILL_AT (a marker file says it did)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from train_mlp import BATCH_SIZE, build_model, loss_fn, optimizer  # noqa: E402, F401
from train_mlp import batch as _batch  # noqa: E402


def batch(step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    marker = os.environ.get("CONVEYOR_TEST_KILL_MARKER")
    if marker and os.environ.get("RANK") == "1" and step == int(os.environ["CONVEYOR_TEST_KILL_AT"]) \
            and not Path(marker).exists():
        Path(marker).write_text(f"killed at step {step}")
        os.kill(os.getpid(), signal.SIGKILL)
    return _batch(step, batch_size)
